"""Held-out agreement and decode cost of the shipped little models in each form they can draft in.

Agreement as in little-report.json (teacher-forced top-1 agreement with the large model's greedy tokens on the
334 held-out calibration records); cost as `bild little` measures it (single-token decode step with a KV cache,
little / large, side by side, min over rounds). A form: which decoder layers stay fp32 (the rest int8) and which
head (the full vocabulary in int8, or an int8 head over a draft vocabulary of the most frequent training tokens;
8,192 is the one stored with the weights). Needs build/little/calibration.jsonl
(`gunzip -c data/little-calibration.jsonl.gz > build/little/calibration.jsonl`).

    python benchmarks/drafting_agreement.py > benchmarks/drafting-agreement.log
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bild.train.align import CalibrationRecord, agreement, read_calibration
from bild.drafters.little import load_little
from bild.train.cost import measure_decode_cost
from bild.train.little import LittleConfig, split_by_index, training_draft_vocabulary
from bild.models import DEFAULT_LARGE, LoadedModel, load_model
from bild.drafters.quantize import quantize_decoder_layers, quantize_output_layer

ALL = tuple(range(len(LittleConfig().init_layers)))
STORED = "stored"  # the 8,192-token draft vocabulary stored with the weights (what load_little uses)
# name -> (decoder layers kept in fp32, head: STORED, a draft vocabulary size, None for the full vocabulary in int8);
# None for the fp32 model as trained
FORMS: dict[str, tuple[tuple[int, ...], str | int | None] | None] = {
    "fp32 as trained": None,
    "fp32 layers, int8 full head": (ALL, None),
    "fp32 layers, 8192 head (shipped)": (ALL, STORED),
    "int8 layers, int8 full head": ((), None),
    "int8 layers but the first, 8192 head": ((0,), STORED),
    "int8 layers but the last, 8192 head": ((ALL[-1],), STORED),
    "int8 layers, 8192 head": ((), STORED),
    "int8 layers, 16384 head": ((), 16384),
}
COMPARED = ("fp32 as trained", "fp32 layers, 8192 head (shipped)", "int8 layers but the first, 8192 head",
            "int8 layers, 8192 head")  # the forms whose cost is measured and the unaligned model is scored


def build_form(large: LoadedModel, variant: str, form: tuple[tuple[int, ...], str | int | None] | None,
               train_records: list[CalibrationRecord]) -> LoadedModel:
    """The variant in a form; a draft vocabulary of another size is counted on ``train_records`` like the stored one."""
    if form is None:
        return load_little(variant, large, int8=False)
    fp32_layers, head = form
    little = load_little(variant, large, int8=head == STORED)  # STORED: fp32 layers, the stored int8 draft head
    quantize_decoder_layers(little.model, keep=fp32_layers)
    if head != STORED:
        vocab = None if head is None else training_draft_vocabulary(
            large, train_records, replace(LittleConfig(), draft_vocab_size=head))
        quantize_output_layer(little.model, vocab)
    return little


def main() -> None:
    config = LittleConfig()
    large = load_model(DEFAULT_LARGE)
    records = [record for record in read_calibration("build/little/calibration.jsonl") if record.output_ids]
    package = [record for record in read_calibration(f"build/little/calibration-{config.package}.jsonl")
               if record.output_ids]
    train, heldout = split_by_index(records, config.heldout_every)
    aligned_train = train + split_by_index(package, config.heldout_every, config.package_prompts)[0]
    tokens = sum(min(len(record.output_ids), config.train.max_target_tokens) for record in heldout)
    print(f"held-out agreement ({len(heldout)} records, {tokens} tokens), 2 threads")
    torch.set_num_threads(2)
    for variant in ("aligned", "unaligned"):
        for name, form in FORMS.items():
            if variant == "aligned" or name in COMPARED:
                little = build_form(large, variant, form, aligned_train)
                print(f"  {variant:9s} {name:38s} {agreement(little, heldout, config.train):.4f}", flush=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name in COMPARED:
            cost = measure_decode_cost(large, build_form(large, "aligned", FORMS[name], aligned_train), rounds=3)
            print(f"decode step, {threads} thread(s), {name:38s}: little {cost.small_ms:.1f} ms / large "
                  f"{cost.large_ms:.1f} ms = {cost.ratio:.1%}", flush=True)


if __name__ == "__main__":
    main()
