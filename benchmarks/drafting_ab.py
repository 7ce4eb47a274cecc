"""What do int8 drafting and the CPU kernel choice each buy BiLD, and at what quality? An A/B/C in one run.

Arms (same trained weights, same examples, interleaved per example with vanilla after a warm-up):
- "int8-head": the little model as shipped before 2026-11-27 (fp32 decoder layers, int8 copy of the full
  49,152-row head), the large model on PyTorch's own linear kernels;
- "int8-draft": the little model as shipped now (int8 decoder layers, int8 head over the 8,192-token draft
  vocabulary stored with the weights; bild.quantize), same large model;
- "int8-draft+mm": as shipped now, with the large model's linear layers on bild.cpu.SmallBatchLinear (what the
  engine does on a CPU since 2026-11-27).
vanilla (transformers generate) always runs on PyTorch's own kernels.
Since the CPU kernel change (2026-11-27, benchmarks/kernels_ab.py) a rerun differs from the committed log's setup:
every arm's large model has bild's GQA attention, and SmallBatchLinear is the oneDNN-packed one.

    python benchmarks/drafting_ab.py --limit 60 --threads 2 > benchmarks/drafting-ab.log
"""

from __future__ import annotations

from functools import partial

import torch

from common import ab_parser, print_methods, with_setup
from bild import BiLDConfig
from bild.cpu import SmallBatchLinear
from bild.decoding import BiLD
from bild.eval.datasets import load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.little import load_little
from bild.models import DEFAULT_LARGE, ModelPair, load_model
from bild.quantize import quantize_output_layer


def use_kernel(linears: list[torch.nn.Linear], small_batch: bool) -> None:
    """Put the large model's linear layers on SmallBatchLinear or on PyTorch's own kernel."""
    kind = SmallBatchLinear if small_batch else torch.nn.Linear
    for linear in linears:
        linear.__class__ = kind


def main() -> None:
    parser = ab_parser(__doc__, settings="0.2/7/10,0.1/7/6,0.2/0/1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    old = load_little("aligned", large, int8=False)
    quantize_output_layer(old.model)  # the previous shipped form: int8 head over the whole vocabulary
    new = load_little("aligned", large)
    base = BiLDConfig(max_new_tokens=args.max_new_tokens)
    contexts = {name: MethodContext(ModelPair(large, small), BiLD(ModelPair(large, small)), base)
                for name, small in (("int8-head", old), ("int8-draft", new))}  # BiLD(...) switches the kernel ...
    linears = [m for m in large.model.modules() if isinstance(m, torch.nn.Linear)]
    methods = {"vanilla": with_setup(build_method("vanilla", contexts["int8-draft"]), partial(use_kernel, linears, False))}
    arms = (("int8-head", "int8-head", False), ("int8-draft", "int8-draft", False), ("int8-draft+mm", "int8-draft", True))
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        for arm, drafter, small_batch in arms:  # ... so every method sets the kernel it runs on
            method = bild_method(contexts[drafter], fallback_threshold=float(fallback),
                                 rollback_threshold=float(rollback), max_small_steps=int(window))
            methods[f"{arm} {setting}"] = with_setup(method, partial(use_kernel, linears, small_batch))
    dataset = load_dataset("docsum", limit=args.limit)
    result = run_methods(contexts["int8-draft"].pair, contexts["int8-draft"].engine, dataset, methods, base)
    print_methods(result, args.max_new_tokens, args.threads)


if __name__ == "__main__":
    main()
