"""What does a wider draft vocabulary buy the aligned little model?

On a CPU the little model drafts through an int8 output layer over a draft vocabulary: the tokens its training data
uses most (``LittleConfig.draft_vocab_size``, counted by ``bild.train.little.training_draft_vocabulary``); every
other token gets a logit of minus infinity, so a token outside it is never drafted. This script saves the aligned
weights of --weights again with vocabularies of other sizes, counted on the same training records as the recipe
(size 0: no draft vocabulary, an int8 output layer over the whole vocabulary), each as a `bild little`-style
directory --out/v<size> for `benchmarks/agreement.py --candidate` and `benchmarks/drafter_cost.py --candidate`.
Nothing is trained: the decoder weights are copied as they are.

Reads the calibration data that `make little` unpacks to build/little (unpacked from data/ when missing).

    python benchmarks/vocab_trial.py --sizes 12288,16384,0 --out /tmp/vocab
    python benchmarks/agreement.py --drafters smollm2-little --candidate /tmp/vocab/v16384:aligned \\
      --candidate /tmp/vocab/v0:aligned
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from common import BenchmarkError, aligned_records, main_guard


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from bild.drafters.little import DRAFT_VOCAB_KEY, WEIGHTS_DIR
    from bild.models import DEFAULT_LARGE, load_model
    from bild.train.little import LittleConfig, training_draft_vocabulary

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", required=True, help="comma-separated draft vocabulary sizes; 0: the whole vocabulary")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="a directory with aligned.safetensors/.json "
                        "(default: the shipped weights)")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>/v<size>/aligned.safetensors/.json")
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        raise BenchmarkError(f"--sizes takes comma-separated integers, got {args.sizes!r}") from None
    for size in sizes:
        if size < 0:
            raise BenchmarkError(f"--sizes: {size} is not a draft vocabulary size (a positive number of tokens, or 0 "
                                 "for the whole vocabulary)")
    weights, meta = args.weights / "aligned.safetensors", args.weights / "aligned.json"
    for path in (weights, meta):
        if not path.is_file():
            raise BenchmarkError(f"{path} does not exist (--weights takes a directory of little-model weights)")

    config = LittleConfig()
    large = load_model(DEFAULT_LARGE, device="cpu")
    records, _ = aligned_records(config)
    stored = load_file(weights)
    shipped = stored.pop(DRAFT_VOCAB_KEY, None)
    for size in sizes:
        tensors = dict(stored)
        if size:
            vocab = training_draft_vocabulary(large, records, replace(config, draft_vocab_size=size))
            tensors[DRAFT_VOCAB_KEY] = vocab.to(torch.int32).contiguous()  # as save_little stores it
            same = shipped is not None and vocab.equal(shipped.long())
            note = f"{len(vocab)} tokens" + (" (the stored vocabulary)" if same else "")
            if len(vocab) < size:
                note += " (every token of the training records)"
        else:
            note = "the whole vocabulary"
        out = args.out / f"v{size}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / "aligned.safetensors")
        shutil.copy(meta, out / "aligned.json")
        print(f"{out}/aligned.safetensors: {note}")
    print(json.dumps({"records": len(records), "weights": str(weights)}))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
