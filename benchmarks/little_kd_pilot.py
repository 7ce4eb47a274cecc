"""Pilot: does token-level distillation on real text (teacher-forced, one large forward per batch) help the little model?

The real text is the unaligned variant's data (each training prompt followed by the docstring's own words); the
targets at every position are the large model's argmax given that prefix, computed on the fly. Modes, at equal steps:
    --mode calibration   8 calibration records per step (the shipped recipe; as little_arch_pilot.py --layers 0,1)
    --mode mixed         8 calibration records + 8 real-text records with the large model's argmax as targets
    --mode real          8 real-text records only: no generated data at all
Held-out agreement is measured as everywhere else: on the large model's greedy outputs for held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bild.align import (
    IGNORE, TrainConfig, _batches, _lr_factor, agreement, batch_logits, make_batch, read_calibration,
    trainable_parameters,
)
from bild.little import build_little, build_prompts
from bild.little_train import LittleConfig, reference_records, split_by_index
from bild.models import DEFAULT_LARGE, load_model


def large_argmax_targets(large, batch) -> torch.Tensor:
    """The batch's targets replaced by the large model's own next-token choice at every target position."""
    with torch.inference_mode():
        choice = batch_logits(large, batch).argmax(-1)  # (batch, target_len)
    return torch.where(batch.targets != IGNORE, choice, IGNORE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["calibration", "mixed", "real"], required=True)
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
    real_text = reference_records(large, build_prompts(LittleConfig().prompts), LittleConfig())
    config = TrainConfig(batch_size=8, learning_rate=args.lr, max_prompt_tokens=192, max_target_tokens=96)
    little = build_little(large, (0, 1))
    params = trainable_parameters(little, freeze_embeddings=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.05 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, args.steps))
    calibration_batches = _batches(calibration, 8, random.Random(0), args.steps)
    real_batches = _batches(real_text, 8, random.Random(1), args.steps)
    little.model.train()
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        loss = torch.zeros(())
        if args.mode in ("calibration", "mixed"):
            batch = make_batch(little, next(calibration_batches), config)
            valid = batch.targets != IGNORE
            loss = loss + F.cross_entropy(batch_logits(little, batch)[valid], batch.targets[valid])
        if args.mode in ("mixed", "real"):
            batch = make_batch(little, next(real_batches), config)
            targets = large_argmax_targets(large, batch)
            valid = targets != IGNORE
            loss = loss + F.cross_entropy(batch_logits(little, batch)[valid], targets[valid])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} {time.perf_counter() - started:.0f}s",
                  flush=True)
    little.model.eval()
    print(json.dumps({
        "mode": args.mode, "lr": args.lr, "steps": args.steps, "calibration_records": len(calibration),
        "real_text_records": len(real_text), "heldout_records": len(heldout),
        "heldout_tokens": sum(min(len(r.output_ids), 96) for r in heldout),
        "agreement": round(agreement(little, heldout, config), 4), "seconds": round(time.perf_counter() - started),
    }), flush=True)


if __name__ == "__main__":
    main()
