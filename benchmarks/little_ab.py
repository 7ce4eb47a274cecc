"""Two aligned little models side by side: the shipped one (A) and a candidate (B) from another weights directory.

In one run, same large model, same examples:
1. teacher-forced top-1 agreement with the large model's greedy tokens, as the models draft (int8), on the held-out
   stdlib calibration records (the report's figure), on the held-out package records (if the file is there), and on
   docsum (eval-reserved stdlib modules, the large model's greedy outputs at max_new_tokens); on docsum also how
   often each is sure (top-1 probability >= 0.6) and right when sure;
2. the decode cost of each as it drafts: one single-token step with a KV cache, little / large, side by side, min
   over rounds (`bild.drafters.little.measure_decode_cost`, the figure the report gives);
3. BiLD on docsum at a few alpha_FB/alpha_RB/N settings for each model, interleaved per example with vanilla after
   a warm-up, as `bild eval` runs methods: speedup over vanilla, ROUGE-L, exact match, tokens per large pass.

    python benchmarks/little_ab.py --candidate build/little-torch/weights --limit 60 --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import ab_parser, print_methods
from bild import BiLDConfig
from bild.train.align import CalibrationRecord, agreement, batch_logits, make_batch, read_calibration
from bild.decoding import BiLD
from bild.eval.datasets import EvalDataset, load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.drafters.little import load_little
from bild.train.cost import measure_decode_cost
from bild.train.little import LittleConfig, package_calibration_path, split_by_index
from bild.models import DEFAULT_LARGE, LoadedModel, ModelPair, load_model


def docsum_records(engine: BiLD, prompts: list[str], max_new_tokens: int) -> list[CalibrationRecord]:
    """The large model's greedy outputs for the prompts, as records to measure agreement on."""
    records = []
    for index, prompt in enumerate(prompts):
        prompt_ids = engine.encode(prompt)
        output_ids = engine.vanilla_ids(prompt_ids, BiLDConfig(max_new_tokens=max_new_tokens)).token_ids
        records.append(CalibrationRecord(index, prompt, prompt_ids, output_ids))
    return records


def sure_and_right(small: LoadedModel, records: list[CalibrationRecord], threshold: float = 0.6) -> tuple[float, float]:
    """Share of output positions where the model's top-1 probability >= threshold, and its agreement there."""
    sure = right = total = 0
    for record in records:
        batch = make_batch(small, [record], LittleConfig().train)
        with torch.no_grad():
            confidence, top = batch_logits(small, batch).float().softmax(-1)[0].max(-1)
        mask = batch.targets[0] >= 0
        confident = (confidence >= threshold) & mask
        sure += int(confident.sum())
        right += int((confident & (top == batch.targets[0])).sum())
        total += int(mask.sum())
    return sure / total, right / max(1, sure)


def main() -> None:
    parser = ab_parser(__doc__, settings="0.2/7/10,0.1/7/6,0.6/5/10,0.2/0/1")
    parser.add_argument("--candidate", type=Path, required=True, help="weights directory of model B")
    parser.add_argument("--work-dir", type=Path, default=Path("build/little"), help="calibration files")
    parser.add_argument("--models", default="A,B", help="which models run BiLD: A, B or A,B (default: %(default)s)")
    parser.add_argument("--no-agreement", action="store_true", help="skip the agreement and cost measurements")
    args = parser.parse_args()
    if not set(args.models.split(",")) <= {"A", "B"} or not args.models:
        parser.error(f"--models takes A, B or A,B, got {args.models!r}")
    torch.set_num_threads(args.threads)
    config = LittleConfig()
    large = load_model(DEFAULT_LARGE)
    models = {"A shipped": load_little("aligned", large), "B candidate": load_little("aligned", large, args.candidate)}
    engines = {name: BiLD(ModelPair(large, small)) for name, small in models.items()}
    docsum = load_dataset("docsum", limit=args.limit)
    if not args.no_agreement:
        measure_agreement_and_cost(args, config, large, models, engines, docsum)

    chosen = [name for name in models if name[0] in args.models.split(",")]
    base = BiLDConfig(max_new_tokens=args.max_new_tokens)
    contexts = {name: MethodContext(ModelPair(large, models[name]), engines[name], base) for name in chosen}
    first = next(iter(contexts.values()))
    methods = {"vanilla": build_method("vanilla", first)}
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        for name, context in contexts.items():
            methods[f"{name[0]} {setting}"] = bild_method(context, fallback_threshold=float(fallback),
                                                          rollback_threshold=float(rollback),
                                                          max_small_steps=int(window))
    result = run_methods(first.pair, first.engine, docsum, methods, base)
    print("A = shipped, B = candidate")
    print_methods(result, args.max_new_tokens, args.threads)


def measure_agreement_and_cost(args: argparse.Namespace, config: LittleConfig, large: LoadedModel,
                               models: dict[str, LoadedModel], engines: dict[str, BiLD], docsum: EvalDataset) -> None:
    """Points 1 and 2 of the module docstring."""
    held_out = {"stdlib held-out": split_by_index(read_calibration(args.work_dir / "calibration.jsonl"),
                                                  config.heldout_every)[1]}
    package_file = package_calibration_path(args.work_dir, config)
    if package_file.is_file():
        package_records = read_calibration(package_file)
        held_out[f"{config.package} held-out"] = split_by_index(package_records, config.heldout_every,
                                                               per_round=len(package_records))[1]  # one round
    engine = next(iter(engines.values()))
    held_out["docsum"] = docsum_records(engine, [docsum.prompt(e) for e in docsum.examples], args.max_new_tokens)
    for name, records in held_out.items():
        records = [record for record in records if record.output_ids]
        tokens = sum(min(len(r.output_ids), config.train.max_target_tokens) for r in records)
        cells = "  ".join(f"{model}: {agreement(small, records, config.train):.4f}" for model, small in models.items())
        print(f"agreement, {name} ({len(records)} records, {tokens} tokens): {cells}", flush=True)
    for model, small in models.items():
        sure, right = sure_and_right(small, held_out["docsum"])
        print(f"docsum, {model}: sure (>= 0.6) on {sure:.1%} of tokens, right on {right:.1%} of those", flush=True)
    for model, small in models.items():
        cost = measure_decode_cost(large, small, rounds=5)
        print(f"decode step, {model}: little {cost.small_ms:.1f} ms / large {cost.large_ms:.1f} ms = {cost.ratio:.1%}",
              flush=True)


if __name__ == "__main__":
    main()
