"""Does token-level distillation make the shipped aligned little model agree more with the large one?

Continues the shipped aligned weights (frozen layer copies, low-rank deltas) for --steps steps of --batch-size
records on one of four mixes, and saves the result as a `bild little`-style directory for
`benchmarks/agreement.py --candidate DIR:aligned`:

- control: calibration records only (the large model's greedy answers to training prompts, as the recipe), so the
  effect of training longer is measured on its own;
- raw: half of them, half token-level distillation on plain text of the broad corpus' training split
  (`bild.train.align.distillation_records`: the little model reads the real text, the targets are the large
  model's top-1 predictions along it);
- ref: half of them, half token-level distillation on the real text as the assistant's answer to a training prompt
  (`teacher_forced_records` on broad prompts not in the calibration data and their reference text);
- add --kl-weight 1 to any mix for the soft cross-entropy on the large model's top-16 as well.

Reads the calibration data that `make little` unpacks to build/little (unpacked from data/ when missing). One thread
by default, so two trials run side by side on a 2-core machine (about 25 minutes of training for 400 steps, plus
the teacher pass of the raw and ref mixes).

    python benchmarks/distil_trial.py --mix control --steps 400 --out /tmp/trial-control
    python benchmarks/agreement.py --drafters smollm2-little --candidate /tmp/trial-control:aligned
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from common import BenchmarkError, aligned_records, main_guard


def distillation_half(large, mix: str, count: int, config) -> list:
    from bild.train.align import distillation_records, encode_prompt, teacher_forced_records
    from bild.train.tasks import build_broad_prompts, iter_raw_passages

    if mix == "raw":
        return distillation_records(large, iter_raw_passages("train"), chunks=count,
                                    chunk_tokens=config.train.max_target_tokens)
    # broad prompts after the ones the calibration data answered, every tenth skipped as the recipe holds them out
    examples = build_broad_prompts(config.broad_prompts + 2 * count, seed=config.seed)[config.broad_prompts:]
    eos = large.eos_token_ids[0]
    pairs = [(encode_prompt(large, example.prompt, config.train.max_prompt_tokens),
              large.tokenizer(example.reference, add_special_tokens=False)["input_ids"][
                  : config.train.max_target_tokens - 1] + [eos])
             for index, example in enumerate(examples) if index % config.heldout_every]
    return teacher_forced_records(large, pairs[:count])


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from safetensors.torch import load_file

    from bild.drafters.little import DRAFT_VOCAB_KEY, WEIGHTS_DIR, build_little, save_little
    from bild.models import DEFAULT_LARGE, load_model
    from bild.train.align import agreement, finetune
    from bild.train.little import LittleConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", choices=("control", "raw", "ref"), required=True)
    parser.add_argument("--steps", type=int, default=400, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="(default: %(default)s)")
    parser.add_argument("--kl-weight", type=float, default=0.0, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="directory for aligned.safetensors/.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        raise BenchmarkError("--steps, --batch-size and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LittleConfig()
    train = replace(config.train, learning_rate=args.learning_rate, kl_weight=args.kl_weight)
    large = load_model(DEFAULT_LARGE, device="cpu")
    pool, broad_heldout = aligned_records(config)
    random.Random(0).shuffle(pool)
    records = args.steps * args.batch_size
    if args.mix == "control":
        chosen = pool[:records]
    else:
        chosen = pool[: records // 2] + distillation_half(large, args.mix, records - records // 2, config)
    meta = json.loads((WEIGHTS_DIR / "aligned.json").read_text())
    little = build_little(large, tuple(meta["init_layers"]), meta["delta_rank"])
    stored = load_file(WEIGHTS_DIR / "aligned.safetensors")
    vocabulary = stored.pop(DRAFT_VOCAB_KEY)
    little.model.load_state_dict(stored, strict=False)  # the frozen copies are the large model's own
    heldout = broad_heldout[:200]
    before = agreement(little, heldout, train)
    result = finetune(little, chosen, replace(train, epochs=records / len(chosen)))  # --steps steps
    after = agreement(little, heldout, train)
    report = {"mix": args.mix, "steps": result.steps, "kl_weight": args.kl_weight, "records": len(chosen),
              "train_seconds": result.seconds, "first_loss": result.first_loss, "final_loss": result.final_loss,
              "agreement_broad_before": before, "agreement_broad_after": after}
    save_little(little, "aligned", tuple(meta["init_layers"]), report, args.out, meta["delta_rank"], vocabulary)
    print(json.dumps(report, indent=2))
    print(f"saved {args.out}/aligned.safetensors: python benchmarks/agreement.py --candidate {args.out}:aligned")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
