"""What every benchmark script shares: provenance stamps, result files, repeated timed runs and their summaries.

Run the scripts from the repository root (`python benchmarks/<script>.py`); they import this file as ``common``.
A result file is written once, under ``benchmarks/results/<question>-<YYYYMMDD-HHMMSS>-<commit>.json``, and never
overwritten: a script refuses to run when its file already exists.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
LITTLE_BUILD = REPO / "build" / "little"  # where `make little` unpacks the calibration data
MIN_REPEATS = 3
LOAD_NOTE = ("the whole machine's 1/5/15-minute load averages and CPU pressure (the share of the last 10/60/300 s in "
             "which some runnable task waited for a CPU) at the start and end of the run; the machine is shared, so a "
             "load above the torch thread count means the timed runs competed with other processes for the CPU")


class BenchmarkError(Exception):
    """Bad input or a refused write: printed as one line, exit code 2."""


# ---- provenance ------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drafter_weights() -> dict[str, str]:
    """sha256 of every shipped drafter weights file (``bild.drafters.WEIGHTS_DIR``), by file name."""
    from bild.drafters import WEIGHTS_DIR

    return {path.name: sha256(path) for path in sorted(WEIGHTS_DIR.glob("*.safetensors"))}


def _bild_version() -> str | None:
    """The version in pyproject.toml of the tree the scripts run from (installed metadata may be another tree's)."""
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1) if found else None


def _load() -> dict:
    """The machine's load averages and, where Linux reports it, the share of time tasks waited for a CPU (PSI)."""
    load = {"average": [round(value, 2) for value in os.getloadavg()]}
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[1:4]  # avg10= avg60= avg300=
        load["cpu_pressure_pct"] = {key: float(value) for key, value in (part.split("=") for part in some)}
    except (OSError, IndexError, ValueError):
        load["cpu_pressure_pct"] = None
    return load


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """Where, when and on what a run was made. Call after ``torch.set_num_threads``; :func:`finish` adds the end.
    ``script``: the running script's ``__file__``; ``argv``: its arguments (default: the command line's)."""
    import transformers

    import bild

    # results and the generated table are outputs of runs, not code: they do not make the tree dirty
    dirty = _git("status", "--porcelain", "--", ".", ":!benchmarks/results", ":!benchmarks/RESULTS.md")
    return {
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(dirty) if dirty is not None else None,
            # "XY path" lines; the first lost its leading blank to the output's strip, so split rather than slice
            "dirty_files": [line.split(maxsplit=1)[-1] for line in dirty.splitlines()][:20] if dirty else [],
        },
        "drafter_weights_sha256": drafter_weights(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bild": _bild_version(),
        },
        "bild_imported_from": str(Path(bild.__file__).resolve().parent),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load": {"start": _load(), "end": None, "note": LOAD_NOTE},
        "command": shlex.join(["python", relative(Path(script)), *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": None,
        "_started": time.perf_counter(),
        "_sampler": LoadSampler(),
    }


def relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


class LoadSampler:
    """The machine's 1-minute load average every ``interval`` seconds while a run lasts (a daemon thread)."""

    def __init__(self, interval: float = 15.0) -> None:
        self.samples = [os.getloadavg()[0]]
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        return {**spread(round(value, 2) for value in self.samples), "interval_s": self.interval}


def finish(stamp: dict) -> dict:
    """The stamp with the end-of-run load, the load sampled during the run, and the wall time."""
    stamp = dict(stamp)
    sampler = stamp.pop("_sampler", None)
    stamp["load"] = {**stamp["load"], "end": _load(),
                     "one_minute_during_run": sampler.stop() if sampler is not None else None}
    stamp["wall_time_s"] = round(time.perf_counter() - stamp.pop("_started"), 1)
    return stamp


# ---- result files ----------------------------------------------------------------------------------------------
def result_path(question: str, stamp: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """``<question>-<YYYYMMDD-HHMMSS>-<short commit>.json``; refuses a name that exists (results are never overwritten)."""
    when = datetime.strptime(stamp["date_utc"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d-%H%M%S")
    commit = (stamp["git"]["commit"] or "nogit")[:7]
    path = results_dir / f"{question}-{when}-{commit}.json"
    if path.exists():
        raise BenchmarkError(f"result file {path} exists; results are never overwritten (wait a second and rerun)")
    return path


def write_result(path: Path, question: str, stamp: dict, settings: dict, results: dict) -> Path:
    """Write one run's JSON and say where (``open(..., "x")``: fails rather than replace a file that appeared
    meanwhile)."""
    data = {"question": question, "provenance": finish(stamp), "settings": settings, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as file:
            file.write(json.dumps(data, indent=1, allow_nan=False) + "\n")
    except FileExistsError:
        raise BenchmarkError(f"result file {path} exists; results are never overwritten") from None
    print(f"result: {relative(path)}", file=sys.stderr)
    return path


def load_candidate(spec: str, large, int8_layers: bool = False):
    """A little model from ``DIR:variant`` (weights written by `bild little --out DIR`), on top of ``large``, drafting
    as the shipped ones do (int8 head; ``int8_layers``: int8 decoder layers too, as ``smollm2-little-int8``)."""
    from bild.drafters.little import load_little

    folder, variant = _candidate_path(spec).parent, spec.rpartition(":")[2]
    return load_little(variant, large, folder, int8_layers=int8_layers)


def calibration_file(name: str) -> Path:
    """build/little/<name>, unpacked from data/little-<name>.gz when `make little` has not done it yet."""
    path = LITTLE_BUILD / name
    if not path.is_file():
        packed = REPO / "data" / f"little-{name}.gz"
        if not packed.is_file():
            raise BenchmarkError(f"neither {path} nor {packed} exists")
        LITTLE_BUILD.mkdir(parents=True, exist_ok=True)
        with gzip.open(packed, "rb") as source, path.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    return path


def aligned_records(config) -> tuple[list, list]:
    """(the records the recipe trains the aligned little model on, the held-out broad records): the training and
    held-out splits of the calibration data, as ``bild.train.little.build_default_little`` makes them for
    ``config`` (a LittleConfig); records without output dropped."""
    from bild.train.align import read_calibration
    from bild.train.little import split_by_index

    if config.package_prompts:
        raise BenchmarkError("the trials read the stdlib and broad calibration data only, not package prompts")
    stdlib = [r for r in read_calibration(calibration_file("calibration.jsonl")) if r.output_ids]
    broad = [r for r in read_calibration(calibration_file("calibration-broad.jsonl")) if r.output_ids]
    broad_train, broad_heldout = split_by_index(broad, config.heldout_every, config.broad_prompts)
    return split_by_index(stdlib, config.heldout_every)[0] + broad_train, broad_heldout


def candidate_weights(specs: Iterable[str]) -> dict[str, str]:
    """sha256 of each ``DIR:variant`` candidate's weights file, by spec (the stamp covers only shipped weights)."""
    return {spec: sha256(_candidate_path(spec)) for spec in specs}


def _candidate_path(spec: str) -> Path:
    folder, _, variant = spec.rpartition(":")
    path = Path(folder) / f"{variant}.safetensors"
    if not folder or not path.is_file():
        raise BenchmarkError(f"--candidate takes DIR:variant with DIR/variant.safetensors, got {spec!r}")
    return path


def spread(values: Iterable[float]) -> dict:
    """Median with min and max, and every value (one per repeat)."""
    values = [float(value) for value in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


# ---- command line ----------------------------------------------------------------------------------------------
def base_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every script takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"timed repeats, at least {MIN_REPEATS}; figures are their median (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the result file goes (default: %(default)s)")
    return parser


def add_docsum_arguments(parser: argparse.ArgumentParser, limit: int = 20) -> None:
    """Data, models and generation length of the scripts that run the evaluation harness."""
    from bild.models import DEFAULT_LARGE, DEFAULT_SMALL

    parser.add_argument("--dataset", default="docsum", help="a name or a .jsonl/.csv/.tsv file (default: %(default)s)")
    parser.add_argument("--prompt-template", help="with {source} (default: the dataset's)")
    parser.add_argument("--limit", type=int, default=limit, help="first LIMIT examples (default: %(default)s)")
    parser.add_argument("--per-kind", type=int, metavar="K",
                        help="first K examples of each kind (tagged sets such as mixed), instead of --limit")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="(default: %(default)s)")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="(default: %(default)s)")
    parser.add_argument("--small", default=DEFAULT_SMALL, help="(default: %(default)s)")


def add_method_arguments(parser: argparse.ArgumentParser, methods: str) -> None:
    """--methods and the BiLD settings (the paper's thresholds by default) of the harness-based scripts."""
    from bild.config import BiLDConfig

    parser.add_argument("--methods", default=methods, help="comma-separated; vanilla always runs (default: %(default)s)")
    parser.add_argument("--fallback-threshold", type=float, default=0.6, help="alpha_FB (default: %(default)s)")
    parser.add_argument("--rollback-threshold", type=float, default=5.0, help="alpha_RB (default: %(default)s)")
    parser.add_argument("--max-small-steps", type=int, default=10, help="N (default: %(default)s)")
    parser.add_argument("--repeat-ngram", type=int, default=BiLDConfig().repeat_ngram,
                        help="bild's repetition guard (not in the paper); 0 = off (default: %(default)s)")
    parser.add_argument("--lookup", type=int, default=None,
                        help="bild's lookup drafting n-gram (not in the paper); 0 = off (default: bild's own, which "
                             "is 2 under the adaptive policy, off under fixed)")


def chosen_methods(args: argparse.Namespace):
    """(method names, vanilla first; the BiLDConfig) from :func:`add_method_arguments`' flags; unknown names refused."""
    from bild.config import BiLDConfig
    from bild.eval.methods import method_names

    names = ["vanilla"] + [name for name in dict.fromkeys(args.methods.split(",")) if name and name != "vanilla"]
    unknown = [name for name in names if name not in method_names()]
    if unknown:
        raise BenchmarkError(f"unknown method {', '.join(unknown)}; choose from {', '.join(method_names())}")
    config = BiLDConfig(fallback_threshold=args.fallback_threshold, rollback_threshold=args.rollback_threshold,
                        max_small_steps=args.max_small_steps, max_new_tokens=args.max_new_tokens,
                        repeat_ngram=args.repeat_ngram, lookup=args.lookup)
    return names, config


def check_arguments(args: argparse.Namespace) -> None:
    """Set the threads; refuse impossible values before any model loads."""
    if args.threads < 1:
        raise BenchmarkError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < MIN_REPEATS:
        raise BenchmarkError(f"--repeats must be >= {MIN_REPEATS} (timed figures are medians of repeats), got {args.repeats}")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise BenchmarkError(f"--limit must be >= 1, got {limit}")
    torch.set_num_threads(args.threads)


def settings_of(args: argparse.Namespace) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def main_guard(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main; bad input (BenchmarkError, or bild's ValueErrors) is one line on stderr and exit code 2;
    Ctrl-C writes nothing and exits with 130."""
    name = Path(main.__code__.co_filename).name
    try:
        return main(argv)
    except (BenchmarkError, ValueError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; no result file written", file=sys.stderr)
        return 130


# ---- the evaluation harness, repeated --------------------------------------------------------------------------
def load_dataset(args: argparse.Namespace):
    from bild.eval.datasets import load_dataset as load

    template = args.prompt_template.replace("\\n", "\n") if args.prompt_template else None
    per_kind = getattr(args, "per_kind", None)
    return load(args.dataset, prompt_template=template, limit=None if per_kind else args.limit, per_kind=per_kind)


def run_repeats(run_once: Callable, repeats: int, examples: int, label: str) -> list:
    """``repeats`` results of ``run_once(warmup, on_progress)``: the untimed warm-up only before the first (the
    harness interleaves methods per example and rotates their order); a tqdm bar over repeats x examples shows the
    running speedups. Ctrl-C stops the run and writes nothing."""
    from tqdm import tqdm

    bar = tqdm(total=repeats * examples, unit="ex", desc=label, file=sys.stderr, dynamic_ncols=True)
    runs = []
    for repeat in range(repeats):
        def progress(done: int, _total: int, speedups: dict[str, float], offset: int = repeat * examples) -> None:
            bar.n = offset + done
            best = sorted(speedups.items(), key=lambda item: -item[1])[:3]
            bar.set_postfix_str(" ".join(f"{name} {value:.2f}x" for name, value in best), refresh=True)

        result = run_once(1 if repeat == 0 else 0, progress)
        if getattr(result, "interrupted", False):  # the harness stops at Ctrl-C and keeps what it has
            bar.close()
            raise KeyboardInterrupt
        runs.append(result)
        bar.n = (repeat + 1) * examples
        bar.refresh()
    bar.close()
    return runs


def run_harness(question: str, script: str, args: argparse.Namespace, argv: list[str] | None, config,
                build_methods: Callable[[object], dict], before: Callable[[object], dict] | None = None,
                timed: bool = True) -> int:
    """The whole run of a harness-based script: data, stamp, models, ``build_methods(context)`` (vanilla first),
    repeats, the table on stdout and one new result file. ``before(context, dataset)``: measurements made after
    loading and before the repeats, added to the results; ``timed`` False: those alone, no repeats."""
    from bild.decoding import BiLD
    from bild.eval.harness import run_methods
    from bild.eval.methods import MethodContext
    from bild.models import load_pair

    dataset = load_dataset(args)
    stamp = provenance(script, argv)
    path = result_path(question, stamp, args.results_dir)
    print(f"loading {args.large} + {args.small} ...", file=sys.stderr)
    pair = load_pair(args.large, args.small)
    engine = BiLD(pair)
    context = MethodContext(pair=pair, engine=engine, config=config, draft_window=getattr(args, "draft_window", 5))
    methods = build_methods(context)
    measured = before(context, dataset) if before is not None else {}
    if not timed:
        write_result(path, question, stamp, settings_of(args), {**measured, "n": len(dataset.examples)})
        return 0

    def once(warmup: int, progress: Callable) -> object:
        return run_methods(pair, engine, dataset, methods, config, warmup=warmup, on_progress=progress)

    runs = run_repeats(once, args.repeats, len(dataset.examples), f"{len(methods)} methods x {args.repeats}")
    results = {**measured, **harness_results(runs, dataset)}
    print_table(results)
    print_kinds(results)
    write_result(path, question, stamp, settings_of(args), results)
    return 0


def summarize_repeats(runs: list) -> dict[str, dict]:
    """Per method: timed figures as median/min/max over repeats; quality and BiLD statistics from the first repeat
    (greedy decoding writes the same tokens every repeat, which ``same_outputs_every_repeat`` checks)."""
    methods = {}
    for name, first in runs[0].summaries.items():
        summaries = [run.summaries[name] for run in runs]
        outputs = [[record.output for record in run.records[name]] for run in runs]
        methods[name] = {
            "speedup": spread(summary.speedup for summary in summaries),
            "throughput_ratio": spread(summary.throughput_ratio for summary in summaries),
            "time_s": spread(summary.time_s for summary in summaries),
            "tokens_per_s": spread(summary.tokens_per_s for summary in summaries),
            **{key: value for key, value in asdict(first).items()
               if key not in ("speedup", "throughput_ratio", "time_s", "tokens_per_s")},
            "same_outputs_every_repeat": all(output == outputs[0] for output in outputs),
        }
    return methods


KIND_FIGURES = ("rougeL", "bleu", "rougeL_vs_large", "exact_match", "fallback_rate", "tokens_per_large_pass",
                "new_tokens")


def summarize_kinds(runs: list) -> dict[str, dict[str, dict]]:
    """Per kind of a tagged dataset (e.g. mixed) and method: speedup and throughput ratio as median/min/max over
    repeats, quality and statistics from the first repeat; {} for an untagged dataset."""
    return {kind: {name: {"speedup": spread(run.kind_summaries[kind][name].speedup for run in runs),
                          "throughput_ratio": spread(run.kind_summaries[kind][name].throughput_ratio for run in runs),
                          **{key: getattr(first, key) for key in KIND_FIGURES}}
                   for name, first in methods.items()}
            for kind, methods in runs[0].kind_summaries.items()}


def example_rows(runs: list) -> list[dict]:
    """Per example and method: the first repeat's output and its time in every repeat."""
    rows = []
    for name, records in runs[0].records.items():
        for index, record in enumerate(records):
            rows.append({
                "index": record.index, "id": record.id, "method": name, "output": record.output,
                "new_tokens": record.new_tokens, "exact_match": record.exact_match,
                "time_s": [round(run.records[name][index].time_s, 4) for run in runs],
            })
    return rows


def harness_results(runs: list, dataset) -> dict:
    """The ``results`` block of a harness-based result file."""
    return {
        "dataset": dataset.name,
        "n": runs[0].n,
        "repeats": len(runs),
        "large": runs[0].large,
        "small": runs[0].small,
        "config": {**asdict(runs[0].config), "rollback_threshold": _json_number(runs[0].config.rollback_threshold)},
        "methods": summarize_repeats(runs),
        "kinds": summarize_kinds(runs),
        "examples": example_rows(runs),
    }


def _json_number(value: float) -> float | str:
    return value if value != float("inf") else "inf"


def parse_setting(text: str) -> tuple[float, float | None, int]:
    """'alpha_FB/alpha_RB/N' (or 'alpha_FB/N' where alpha_RB is fixed by the script) -> numbers."""
    parts = text.split("/")
    try:
        if len(parts) == 3:
            return float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) == 2:
            return float(parts[0]), None, int(parts[1])
    except ValueError:
        pass
    raise BenchmarkError(f"a setting is alpha_FB/alpha_RB/N or alpha_FB/N with numbers, got {text!r}")


def print_kinds(results: dict) -> None:
    """Per kind (tagged datasets): each method's speedup and throughput ratio over vanilla, medians of the repeats."""
    kinds = results.get("kinds") or {}
    if not kinds:
        return
    names = [name for name in next(iter(kinds.values())) if name != "vanilla"]
    print("\nper kind: speedup (latency) / tok/s ratio, medians")
    print(f"{'kind':12s} " + " ".join(f"{name:>22s}" for name in names))
    for kind, methods in kinds.items():
        cells = [f"{methods[name]['speedup']['median']:.2f}x / {methods[name]['throughput_ratio']['median']:.2f}x"
                 for name in names]
        print(f"{kind:12s} " + " ".join(f"{cell:>22s}" for cell in cells))


def print_table(results: dict) -> None:
    """The summary of a harness-based run on stdout."""
    print(f"{results['dataset']}, n={results['n']}, {results['repeats']} repeats; speedup median [min-max]")
    print(f"{'method':24s} {'speedup':>20s} {'ROUGE-L':>8s} {'rep-4':>6s} {'exact':>6s} {'tok/pass':>8s}")
    for name, method in results["methods"].items():
        speed = method["speedup"]
        cell = f"{speed['median']:.2f}x [{speed['min']:.2f}-{speed['max']:.2f}]"
        per_pass = method["tokens_per_large_pass"]
        print(f"{name:24s} {cell:>20s} {method['rougeL'] or 0:8.2f} {method['rep4'] or 0:6.2f} "
              f"{method['exact_match']:6.2f} {'-' if per_pass is None else f'{per_pass:.2f}':>8s}")
