"""Pilots for the little model: held-out agreement after a short, fixed training budget, at equal steps and data.

Architecture (data: the calibration records, as `bild little` trains on):
    python benchmarks/little_pilot.py --layers 0,1                          # the shipped shape, all weights trained
    python benchmarks/little_pilot.py --layers 0,6,12,18,24,29 --rank 64 --lr 2e-3   # frozen layers + low-rank deltas
Data (2 layers from 0,1):
    --data real     token-level distillation on real text: the unaligned variant's inputs (prompt + the docstring's
                    own words) with the large model's argmax after every prefix as targets (one large forward per
                    batch, no generation)
    --data mixed    each step 8 calibration records and 8 real-text records as above
Held-out agreement is measured as everywhere else: teacher-forced on the large model's greedy outputs for held-out
prompts. Only the records present at start are used (sorted by prompt index), so pilots started together on a
growing calibration file see the same data; give them a fixed copy with --calibration to be sure. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bild.train.align import (
    IGNORE, TrainConfig, _batches, agreement, batch_logits, finetune, make_batch, make_optimizer, optimizer_step,
    read_calibration, trainable_parameters,
)
from bild.drafters.little import build_little
from bild.train.prompts import build_prompts
from bild.train.little import LittleConfig, reference_records, split_by_index
from bild.models import DEFAULT_LARGE, load_model


def distillation_loss(little, large, records, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy of the little model against the large model's own next-token choice after each real prefix."""
    batch = make_batch(little, records, config)
    with torch.inference_mode():
        choice = batch_logits(large, batch).argmax(-1)  # (batch, target_len)
    valid = batch.targets != IGNORE
    return F.cross_entropy(batch_logits(little, batch)[valid], choice[valid])


def train_with_real_text(little, large, calibration, steps: int, config: TrainConfig, mixed: bool) -> None:
    params = trainable_parameters(little, freeze_embeddings=True)
    optimizer, schedule = make_optimizer(params, config, steps)
    real_text = reference_records(large, build_prompts(LittleConfig().prompts), LittleConfig())
    calibration_batches = _batches(calibration, 8, random.Random(0), steps)
    real_batches = _batches(real_text, 8, random.Random(1), steps)
    little.model.train()
    started = time.perf_counter()
    for step in range(steps):
        loss = distillation_loss(little, large, next(real_batches), config)
        if mixed:
            batch = make_batch(little, next(calibration_batches), config)
            valid = batch.targets != IGNORE
            loss = loss + F.cross_entropy(batch_logits(little, batch)[valid], batch.targets[valid])
        optimizer_step(loss, params, optimizer, schedule)
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - started:.0f}s", flush=True)
    little.model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,1", help="large-model layers to start from (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=0, help="low-rank delta rank (0: train the layers themselves)")
    parser.add_argument("--data", choices=["calibration", "mixed", "real"], default="calibration")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--heldout-records", type=int, default=60)
    parser.add_argument("--calibration", type=Path, default=Path("build/little/calibration.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    large = load_model(DEFAULT_LARGE)
    records = sorted((r for r in read_calibration(args.calibration) if r.output_ids), key=lambda r: r.index)
    calibration, heldout = split_by_index(records, heldout_every=10)
    calibration, heldout = calibration[: args.train_records], heldout[: args.heldout_records]
    little = build_little(large, tuple(int(part) for part in args.layers.split(",")), args.rank)
    config = TrainConfig(epochs=args.steps * 8 / len(calibration), batch_size=8, learning_rate=args.lr,
                         max_prompt_tokens=192, max_target_tokens=96)
    started = time.perf_counter()
    if args.data == "calibration":
        finetune(little, calibration, config)
    else:
        train_with_real_text(little, large, calibration, args.steps, config, mixed=args.data == "mixed")
    print(json.dumps({
        "layers": args.layers, "rank": args.rank, "data": args.data, "lr": args.lr, "steps": args.steps,
        "calibration_records": len(calibration), "heldout_records": len(heldout),
        "heldout_tokens": sum(min(len(r.output_ids), 96) for r in heldout),
        "agreement": round(agreement(little, heldout, config), 4),
        "trainable_parameters": sum(p.numel() for p in little.model.parameters() if p.requires_grad),
        "seconds": round(time.perf_counter() - started),
    }), flush=True)


if __name__ == "__main__":
    main()
