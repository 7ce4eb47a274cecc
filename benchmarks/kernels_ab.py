"""What the large model's CPU kernels buy BiLD and hf-assisted: the previous kernels against the current ones, in one run.

Arms (same shipped little model, same examples, interleaved per example with vanilla after a warm-up):
- "before": the large model's linear layers on the previous bild.cpu.SmallBatchLinear (``W @ x^T`` for 4-64 rows,
  whose transposed output also pushed attention off its flash kernel) and transformers' SDPA attention
  (``repeat_kv`` copies for blocks of 2+ tokens): what the engine did from 2026-11-27 until this change;
- "now": bild.cpu.use_cpu_kernels as the engine applies it now (oneDNN packed weights for 4-64 rows, contiguous
  outputs; ``enable_gqa`` attention for blocks).
vanilla (transformers generate, one-token steps) runs on PyTorch's own linear kernels and SDPA.
Before the run, one large pass over k = 1..11 tokens is timed for each arm (median of interleaved rounds).

    python benchmarks/kernels_ab.py --limit 60 --threads 2 > benchmarks/kernels-ab.log
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from common import ab_parser, measure_pass_ms, print_methods, with_setup
from bild import BiLDConfig
from bild.cpu import CPU_ATTENTION, SmallBatchLinear
from bild.decoding import BiLD
from bild.eval.datasets import load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.drafters.little import load_little
from bild.models import DEFAULT_LARGE, ModelPair, load_model


class PreviousSmallBatchLinear(torch.nn.Linear):
    """bild.cpu.SmallBatchLinear as it was before this change: ``(W @ x^T)^T`` for 4-64 rows, output left transposed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not 4 <= rows <= 64 or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).T.contiguous()  # (in, rows)
        out = torch.mm(self.weight, flat).T.reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return out if self.bias is None else out + self.bias


ARMS = {  # arm -> (linear class, attention implementation)
    "plain": (torch.nn.Linear, "sdpa"),
    "before": (PreviousSmallBatchLinear, "sdpa"),
    "now": (SmallBatchLinear, CPU_ATTENTION),
}


def set_arm(model: torch.nn.Module, linears: list[torch.nn.Linear], arm: str) -> None:
    kind, attention = ARMS[arm]
    for linear in linears:
        linear.__class__ = kind
    model.set_attn_implementation(attention)


def main() -> None:
    parser = ab_parser(__doc__, settings="0.2/7/10,0.1/7/6,0.2/0/1,0.4/0/3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    pair = ModelPair(large, load_little("aligned", large))
    context = MethodContext(pair, BiLD(pair), BiLDConfig(max_new_tokens=args.max_new_tokens))  # switches to "now"
    model = large.model
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]

    arms = {arm: partial(set_arm, model, linears, arm) for arm in ARMS}
    costs = measure_pass_ms(model, range(1, 12), arms, rounds=9)
    one_token = costs["plain"][1]
    print(f"large pass over k tokens, x a one-token step on PyTorch's kernels ({one_token:.1f} ms), median of 9:")
    for arm, by_width in costs.items():
        print(f"  {arm:6s} " + " ".join(f"k={width}: {ms / one_token:.2f}x" for width, ms in by_width.items()))

    methods = {"vanilla": with_setup(build_method("vanilla", context), arms["plain"])}
    for arm in ("before", "now"):
        methods[f"hf-assisted {arm}"] = with_setup(build_method("hf-assisted", context), arms[arm])
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        method = bild_method(context, fallback_threshold=float(fallback), rollback_threshold=float(rollback),
                             max_small_steps=int(window))
        for arm in ("before", "now"):
            methods[f"{arm} {setting}"] = with_setup(method, arms[arm])
    dataset = load_dataset("docsum", limit=args.limit)
    result = run_methods(pair, context.engine, dataset, methods, context.config)
    print_methods(result, args.max_new_tokens, args.threads)


if __name__ == "__main__":
    main()
