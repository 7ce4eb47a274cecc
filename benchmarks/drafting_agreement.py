"""Held-out agreement and decode cost of the shipped little models, as trained (fp32) and as they draft (int8).

Agreement as in little-report.json (teacher-forced top-1 agreement with the large model's greedy tokens on the
334 held-out calibration records); cost as `bild little` measures it (single-token decode step with a KV cache,
little / large, side by side, min over rounds). Needs build/little/calibration.jsonl
(`gunzip -c data/little-calibration.jsonl.gz > build/little/calibration.jsonl`).

    python benchmarks/drafting_agreement.py > benchmarks/drafting-agreement.log
"""

from __future__ import annotations

import torch

from bild.align import agreement, read_calibration
from bild.little import load_little, measure_decode_cost
from bild.little_train import LittleConfig, split_by_index
from bild.models import DEFAULT_LARGE, LoadedModel, load_model
from bild.quantize import quantize_output_layer


def forms(large: LoadedModel, variant: str) -> dict[str, LoadedModel]:
    """The variant as trained, with only an int8 head (shipped until 2026-11-26), and as it drafts now."""
    head_only = load_little(variant, large, int8=False)
    quantize_output_layer(head_only.model)
    return {"fp32 as trained": load_little(variant, large, int8=False), "int8 head only": head_only,
            "int8 drafting (layers + draft vocabulary)": load_little(variant, large)}


def main() -> None:
    config = LittleConfig()
    large = load_model(DEFAULT_LARGE)
    records = [record for record in read_calibration("build/little/calibration.jsonl") if record.output_ids]
    _, heldout = split_by_index(records, config.heldout_every)
    tokens = sum(min(len(record.output_ids), config.train.max_target_tokens) for record in heldout)
    print(f"held-out agreement ({len(heldout)} records, {tokens} tokens), 2 threads")
    torch.set_num_threads(2)
    for variant in ("aligned", "unaligned"):
        for form, little in forms(large, variant).items():
            print(f"  {variant:9s} {form:42s} {agreement(little, heldout, config.train):.4f}", flush=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for form, little in forms(large, "aligned").items():
            cost = measure_decode_cost(large, little, rounds=3)
            print(f"decode step, {threads} thread(s), {form:42s}: little {cost.small_ms:.1f} ms / large "
                  f"{cost.large_ms:.1f} ms = {cost.ratio:.1%}", flush=True)


if __name__ == "__main__":
    main()
