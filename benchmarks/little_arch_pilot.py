"""Pilot: held-out agreement of a little-model architecture after a fixed, short training budget.

Compares architectures at equal steps and data on a calibration file (what `bild little --calibration-only` writes):
    python benchmarks/little_arch_pilot.py --layers 0,1 --rank 0 --lr 3e-3                  # the shipped shape
    python benchmarks/little_arch_pilot.py --layers 0,6,12,18,24,29 --rank 64 --lr 2e-3      # low-rank deltas
Prints one JSON line. Only the records present at start are used (sorted by prompt index), so two pilots started
together see the same data even while the calibration file is still growing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bild.align import TrainConfig, agreement, finetune, read_calibration
from bild.little import build_little
from bild.little_train import split_by_index
from bild.models import DEFAULT_LARGE, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", required=True, help="large-model layers to start from, e.g. 0,1")
    parser.add_argument("--rank", type=int, default=0, help="low-rank delta rank (0: train the layers themselves)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--heldout-records", type=int, default=60)
    parser.add_argument("--calibration", type=Path, default=Path("build/little/calibration.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    records = sorted((r for r in read_calibration(args.calibration) if r.output_ids), key=lambda r: r.index)
    train, heldout = split_by_index(records, heldout_every=10)
    train, heldout = train[: args.train_records], heldout[: args.heldout_records]
    layers = tuple(int(part) for part in args.layers.split(","))
    little = build_little(large, layers, args.rank)
    config = TrainConfig(epochs=args.steps * 8 / len(train), batch_size=8, learning_rate=args.lr,
                         max_prompt_tokens=192, max_target_tokens=96)
    started = time.perf_counter()
    result = finetune(little, train, config)
    print(json.dumps({
        "layers": layers, "rank": args.rank, "lr": args.lr, "train_records": len(train),
        "heldout_records": len(heldout), "heldout_tokens": sum(min(len(r.output_ids), 96) for r in heldout),
        "steps": result.steps, "loss_first_final": [round(result.first_loss, 3), round(result.final_loss, 3)],
        "agreement": round(agreement(little, heldout, config), 4),
        "trainable_parameters": sum(p.numel() for p in little.model.parameters() if p.requires_grad),
        "seconds": round(time.perf_counter() - started),
    }), flush=True)


if __name__ == "__main__":
    main()
