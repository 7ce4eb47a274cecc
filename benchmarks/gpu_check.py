"""GPU check: is lossless BiLD exact, and how fast are BiLD and lossless BiLD, in float32, bfloat16 and float16?

One run, one device, every dtype side by side. For each dtype the pair is loaded in that dtype, warmed up, and then
every prompt runs three ways, interleaved (the order rotates per prompt):

- vanilla: the large model alone, greedy, through bild's own cache loop (the reference);
- bild: BiLD at the paper's thresholds (alpha_FB 0.6, alpha_RB 5, N 10; bild's default repetition guard);
- lossless: BiLD with alpha_RB = 0, whose output must be exactly vanilla's, token for token.

speedup = sum of vanilla's times / sum of the method's times (same prompts, same max_new_tokens). The table is
printed and the whole result, stamped with the git commit, date, versions and device, is saved as JSON.

    python benchmarks/gpu_check.py                                    # on a CUDA machine: the default pair
    python benchmarks/gpu_check.py --device cpu --dtypes float32,bfloat16 --prompts 4
    python benchmarks/gpu_check.py --device cuda:1 --large ./my-large --small ./my-small --out my-check.json

Run from the repository root (``PYTHONPATH=src`` unless bild is installed).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.devices import PlacementError, resolve_device
from bild.eval.datasets import load_dataset
from bild.models import DEFAULT_LARGE, DEFAULT_SMALL, load_pair
from common import provenance, result_path, write_result

METHODS = ("vanilla", "bild", "lossless")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class MethodTotals:
    time_s: float = 0.0
    tokens: int = 0
    small_tokens_kept: int = 0
    fallbacks: int = 0
    rollbacks: int = 0
    equal_to_vanilla: int = 0  # prompts whose output is vanilla's, token for token


@dataclass
class DtypeResult:
    dtype: str
    totals: dict[str, MethodTotals] = field(default_factory=lambda: {name: MethodTotals() for name in METHODS})
    prompts: list[dict] = field(default_factory=list)

    def row(self, n: int) -> dict:
        vanilla = self.totals["vanilla"]
        row = {"dtype": self.dtype, "prompts": n, "vanilla_tokens_per_s": vanilla.tokens / vanilla.time_s}
        for name in ("bild", "lossless"):
            totals = self.totals[name]
            row[f"{name}_speedup"] = vanilla.time_s / totals.time_s
            row[f"{name}_equal_to_vanilla"] = totals.equal_to_vanilla
            row[f"{name}_small_share"] = totals.small_tokens_kept / max(totals.tokens, 1)
            row[f"{name}_fallback_rate"] = totals.fallbacks / max(totals.tokens, 1)
            row[f"{name}_rollback_rate"] = totals.rollbacks / max(totals.tokens, 1)
        row["lossless_exact"] = self.totals["lossless"].equal_to_vanilla == n
        return row


def cpu_name() -> str:
    """The processor's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def configs(args: argparse.Namespace) -> dict[str, BiLDConfig]:
    paper = BiLDConfig(fallback_threshold=0.6, rollback_threshold=5.0, max_small_steps=10,
                       max_new_tokens=args.max_new_tokens)
    return {"vanilla": paper, "bild": paper, "lossless": BiLDConfig(fallback_threshold=0.6, rollback_threshold=0.0,
                                                                     max_small_steps=10, max_new_tokens=args.max_new_tokens)}


def run_dtype(args: argparse.Namespace, dtype: str, prompts: list[str]) -> DtypeResult:
    """Load the pair in ``dtype``, warm up, then run every prompt all three ways, interleaved."""
    pair = load_pair(args.large, args.small, device=args.device, dtype=dtype)
    engine = BiLD(pair)
    settings = configs(args)
    ids = [engine.encode(prompt) for prompt in prompts]
    runs = {"vanilla": engine.vanilla_ids, "bild": engine.generate_ids, "lossless": engine.generate_ids}
    for _ in range(args.warmup):  # untimed: kernels, caches and allocators settle
        for name in METHODS:
            runs[name](ids[0], BiLDConfig(max_new_tokens=min(8, args.max_new_tokens)))
    result = DtypeResult(dtype)
    for index, prompt_ids in enumerate(ids):
        order = METHODS[index % 3:] + METHODS[: index % 3]
        outputs = {name: runs[name](prompt_ids, settings[name]) for name in order}
        per_prompt = {"index": index}
        for name, output in outputs.items():
            totals = result.totals[name]
            totals.time_s += output.stats.wall_time_s
            totals.tokens += output.stats.new_tokens
            totals.small_tokens_kept += output.stats.small_tokens_kept
            totals.fallbacks += output.stats.fallbacks
            totals.rollbacks += output.stats.rollbacks
            totals.equal_to_vanilla += output.token_ids == outputs["vanilla"].token_ids
            per_prompt[name] = {"time_s": output.stats.wall_time_s, "tokens": output.stats.new_tokens,
                                "equal_to_vanilla": output.token_ids == outputs["vanilla"].token_ids}
        result.prompts.append(per_prompt)
        print(f"  {dtype} prompt {index + 1}/{len(ids)}: " + ", ".join(
            f"{name} {outputs[name].stats.wall_time_s:.2f} s" for name in METHODS), file=sys.stderr, flush=True)
    del engine, pair
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def format_table(rows: list[dict], header: str) -> str:
    columns = [("dtype", "dtype", "{}"), ("vanilla tok/s", "vanilla_tokens_per_s", "{:.1f}"),
               ("BiLD speedup", "bild_speedup", "{:.2f}x"), ("lossless speedup", "lossless_speedup", "{:.2f}x"),
               ("lossless = vanilla", "lossless_equal_to_vanilla", None), ("BiLD = vanilla", "bild_equal_to_vanilla", None),
               ("BiLD small share", "bild_small_share", "{:.0%}"), ("BiLD fallback/tok", "bild_fallback_rate", "{:.2f}"),
               ("BiLD rollback/tok", "bild_rollback_rate", "{:.2f}")]
    table = [[title for title, _, _ in columns]]
    for row in rows:
        table.append([f"{row[key]}/{row['prompts']}" if fmt is None else fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [header]
    for index, line in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="\n".join(line for line in __doc__.splitlines() if "gpu_check.py" in line),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or mps (default: %(default)s)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="(default: %(default)s)")
    parser.add_argument("--small", default=DEFAULT_SMALL, help="(default: %(default)s)")
    parser.add_argument("--dataset", default="docsum", help="prompts: a bild eval dataset (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=20, help="how many of its prompts (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per dtype (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="JSON result (default: benchmarks/results/gpu-check-<device>-<date>-<commit>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except PlacementError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    dataset = load_dataset(args.dataset, limit=args.prompts)
    prompts = [dataset.prompt(example) for example in dataset.examples]
    stamp = provenance(__file__, argv)
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cuda": torch.version.cuda}
    header = (f"{args.large} + {args.small} on {info['device']} ({info['device_name']}), torch {torch.__version__}, "
              f"{len(prompts)} {args.dataset} prompts, max_new_tokens {args.max_new_tokens}; BiLD at alpha_FB 0.6, "
              f"alpha_RB 5, N 10; lossless = alpha_RB 0")
    print(header, file=sys.stderr)
    results = [run_dtype(args, dtype, prompts) for dtype in dtypes]
    rows = [result.row(len(prompts)) for result in results]
    print(format_table(rows, header))
    out = args.out or result_path(f"gpu-check-{device.type}", stamp)
    write_result(out, f"gpu-check-{device.type}", stamp, {key: str(value) for key, value in vars(args).items()},
                 {"device": info, "rows": rows, "per_prompt": {result.dtype: result.prompts for result in results}})
    return 0 if all(row["lossless_exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
