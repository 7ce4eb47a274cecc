"""Regenerate benchmarks/RESULTS.md, and the headline table in README.md, from the result files.

For every question the result file used is the one named in benchmarks/cited.json (question -> file name in
benchmarks/results/), else the newest by its provenance date. RESULTS.md gets one section per question; README.md
gets the headline table (the paper's-thresholds run and lossless mode) between the lines
``<!-- results:start -->`` and ``<!-- results:end -->``; without those lines README.md is left alone. Every figure
links to the result file it comes from.

    python benchmarks/results_table.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path

from common import REPO, RESULTS_DIR, BenchmarkError, drafter_weights, main_guard

BENCHMARKS = REPO / "benchmarks"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# question -> (script, the question in words), in the order RESULTS.md lists them
QUESTIONS = {
    "paper-table": ("paper_table.py", "How does BiLD compare with the alternatives at the paper's thresholds?"),
    "lossless": ("lossless.py", "How fast is BiLD when its output must be exactly the large model's?"),
    "sweep": ("sweep.py", "How do the thresholds trade quality for speed?"),
    "drafter-cost": ("drafter_cost.py", "How well does each drafter agree with the large model, and what does it cost?"),
    "kernels": ("kernels.py", "What do bild's CPU kernels buy?"),
    "server-load": ("server_load.py", "How does `bild serve` hold up under concurrent clients?"),
    "adaptive": ("adaptive.py", "Is BiLD at least as fast as the large model alone on prompts of every kind?"),
    "agreement": ("agreement.py", "How often does each drafter pick the large model's token, per kind of prompt?"),
}
# method -> its label; {fb} {rb} {n} {window} are the run's alpha_FB, alpha_RB, N and speculative draft window
HEADLINE_METHODS = {  # question -> the methods in the headline table (a regular expression on their names)
    "paper-table": r"vanilla|bild|bild-fixed|bild-lossless|bild-lossless-fixed|hf-assisted|hf-prompt-lookup|speculative",
    "lossless": r"bild-lossless .+",  # the paper's-thresholds run already has the baseline and the others
}
METHOD_LABELS = {
    "vanilla": "large model alone (transformers `generate`)",
    "bild": "BiLD (alpha_FB {fb} / alpha_RB {rb} / N {n})",
    "bild-lossless": "BiLD lossless (alpha_FB {fb} / alpha_RB 0 / N {n})",
    "bild-fixed": "BiLD, fixed policy (alpha_FB {fb} / alpha_RB {rb} / N {n})",
    "bild-lossless-fixed": "BiLD lossless, fixed policy (alpha_FB {fb} / alpha_RB 0 / N {n})",
    "hf-assisted": "transformers assisted generation (same small model)",
    "hf-prompt-lookup": "transformers prompt lookup decoding (no small model)",
    "bild-no-lookup": "BiLD without lookup drafts (alpha_FB {fb} / alpha_RB {rb} / N {n})",
    "bild-lossless-no-lookup": "BiLD lossless without lookup drafts (alpha_FB {fb} / alpha_RB 0 / N {n})",
    "speculative": "speculative decoding (window {window}, exact-match check)",
    "small": "small model alone",
    "bild-no-rollback": "BiLD without rollback (alpha_FB {fb} / alpha_RB inf / N {n}, no repetition guard)",
    "bild-no-fallback": "BiLD without fallback (alpha_FB 0 / alpha_RB {rb} / N {n})",
    "vanilla-loop": "large model alone (bild's loop)",
    "bild-early-exit": "BiLD drafting with an early exit (alpha_FB {fb} / alpha_RB {rb} / N {n})",
}


# ---- choosing the files ----------------------------------------------------------------------------------------
def read_result(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{path} is not a readable result file ({error})") from None
    if not isinstance(data, dict) or not {"question", "provenance", "results"} <= data.keys():
        raise BenchmarkError(f"{path} is not a result file (needs question, provenance and results)")
    return data


def choose(results_dir: Path, cited: Path | None) -> dict[str, list[tuple[Path, dict]]]:
    """question -> [(file, its data)]: the files cited for it, else the newest by provenance date (then by name) for
    each dataset it was run on. benchmarks/cited.json names one file or a list of files per question."""
    newest: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        data = read_result(path)
        key = (data["question"], str(data["results"].get("dataset", "")))
        current = newest.get(key)
        if current is None or _date_key(path, data) > _date_key(*current):
            newest[key] = (path, data)
    chosen: dict[str, list[tuple[Path, dict]]] = {}
    for (question, _), entry in sorted(newest.items()):
        chosen.setdefault(question, []).append(entry)
    if cited is not None and cited.is_file():
        try:
            names = json.loads(cited.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{cited} is not valid JSON ({error.msg})") from None
        for question, files in names.items():
            chosen[question] = [_cited(results_dir, cited, question, name)
                                for name in ([files] if isinstance(files, str) else files)]
    return chosen


def _date_key(path: Path, data: dict) -> tuple[str, str]:
    return data["provenance"].get("date_utc") or "", path.name


def _cited(results_dir: Path, cited: Path, question: str, name: str) -> tuple[Path, dict]:
    path = results_dir / name
    if not path.is_file():
        raise BenchmarkError(f"{cited} cites {name} for {question!r}, but {path} does not exist")
    data = read_result(path)
    if data["question"] != question:
        raise BenchmarkError(f"{cited} cites {name} for {question!r}, but it answers {data['question']!r}")
    return path, data


# ---- formatting ------------------------------------------------------------------------------------------------
def link(text: str, target: Path, base: Path) -> str:
    return f"[{text}]({Path(os.path.relpath(target, base)).as_posix()})"


def speed(value: dict, source: Path, base: Path) -> str:
    """A speedup: its median linked to its file, then its min-max over the repeats."""
    return spread_cell(value, source, base, 2, "x")


def number(value, source: Path, base: Path, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else link(f"{value:.{digits}f}{suffix}", source, base)


def stamp_line(data: dict, source: Path, base: Path, dated: bool = True) -> str:
    """Where a file's figures come from, in one line (``dated``: with the run's date and the machine's load; the
    README's table leaves them to the file)."""
    stamp = data["provenance"]
    git, load = stamp["git"], stamp["load"]
    commit = (git.get("commit") or "unknown")[:7] + (" + uncommitted changes" if git.get("dirty") else "")
    start, end = (load[when]["average"][0] if load.get(when) else "?" for when in ("start", "end"))
    during = load.get("one_minute_during_run")
    during = f", median {during['median']:.1f} (max {during['max']:.1f}) during the run" if during else ""
    minutes = f", {stamp['wall_time_s'] / 60:.0f} min" if stamp.get("wall_time_s") else ""
    versions = (f"torch {stamp['versions']['torch']}, transformers {stamp['versions']['transformers']}, "
                f"torch threads {stamp['torch_threads']} on {stamp['cpu_count']} CPUs")
    weights = other_weights(stamp)
    if not dated:
        return f"File {link(source.name, source, base)}: `{stamp['command']}`; commit {commit}, {versions}.{weights}"
    return (f"File {link(source.name, source, base)}: `{stamp['command']}`; commit {commit}, {stamp['date_utc']}, "
            f"{versions}; 1-minute load average of the shared machine {start} at start{during}, {end} at end{minutes}."
            f"{weights}")


def other_weights(stamp: dict) -> str:
    """A warning when a file was measured with earlier shipped drafter weights than the ones shipped now (the
    stamp's sha256 of ``src/bild/weights``; a ``--candidate`` is stamped apart and not compared), else ''."""
    shipped = shipped_weights()
    measured = stamp.get("drafter_weights_sha256") or {}
    differ = sorted(name for name, digest in measured.items() if name in shipped and shipped[name] != digest)
    if not differ:
        return ""
    files = ", ".join(f"`{name}` {measured[name][:8]}" for name in differ)
    return f" **Measured with earlier drafter weights, not the ones shipped now:** {files}."


@functools.cache
def shipped_weights() -> dict[str, str]:
    return drafter_weights()


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def method_label(name: str, data: dict) -> str:
    lossless = re.fullmatch(r"bild-lossless ([\d.]+)/(\d+)", name)  # lossless.py's "bild-lossless <alpha_FB>/<N>"
    if lossless:
        return f"BiLD lossless (alpha_FB {lossless[1]} / alpha_RB 0 / N {lossless[2]})"
    config = data["results"]["config"]
    rollback = config["rollback_threshold"]
    return METHOD_LABELS.get(name, name).format(
        fb=f"{config['fallback_threshold']:g}", rb=rollback if isinstance(rollback, str) else f"{rollback:g}",
        n=config["max_small_steps"], window=data["settings"].get("draft_window", "?"))


def harness_setting(results: dict, data: dict) -> str:
    guard = results["config"].get("repeat_ngram")
    guard = f", bild's repetition guard at {guard}-grams" if guard else ", no repetition guard"
    return (f"{results['dataset']}, {results['n']} examples, {results['config']['max_new_tokens']} new tokens, greedy"
            f"{guard}, median of {results['repeats']} repeats (min-max)")


# ---- the headline ----------------------------------------------------------------------------------------------
def headline(chosen: dict, base: Path) -> list[str]:
    """The README table: the main methods of the paper's-thresholds run and lossless mode; figures link to their
    files, links relative to ``base`` (the folder of the file the table goes into)."""
    rows, notes = [], []
    header = ["method", "speedup over the large model alone", "ROUGE-L", "exact match with the large model",
              "tokens per large pass", "script"]
    for question in ("paper-table", "lossless"):
        if question not in chosen:
            continue
        source, data = chosen[question][0]
        results = data["results"]
        script = link(QUESTIONS[question][0], BENCHMARKS / QUESTIONS[question][0], base)
        for name, method in results["methods"].items():
            if not re.fullmatch(HEADLINE_METHODS[question], name):
                continue  # RESULTS.md's sections have the rest
            rows.append([method_label(name, data), speed(method["speedup"], source, base),
                         number(method["rougeL"], source, base, 1), number(method["exact_match"], source, base),
                         number(method["tokens_per_large_pass"], source, base), script])
        policy = results["config"].get("policy", "fixed")  # runs made before the adaptive policy used Algorithm 1
        lookup = lookup_ngram(results["config"])
        drafts = f" with lookup drafts on {lookup}-grams" if lookup else ""
        notes.append(f"{QUESTIONS[question][0]}: {harness_setting(results, data)}, BiLD's {policy} policy{drafts}. "
                     + stamp_line(data, source, base, dated=False))
    if not rows:
        return ["No results yet: run `python benchmarks/paper_table.py` (see benchmarks/README.md)."]
    return table(header, rows) + [""] + [f"- {note}" for note in notes]


def lookup_ngram(config: dict) -> int:
    """The lookup drafts' n-gram length a result's BiLD config ran with (0: none, as in runs made before them)."""
    from bild.config import BiLDConfig

    if "lookup" not in config:
        return 0
    return BiLDConfig(policy=config.get("policy", "fixed"), lookup=config["lookup"]).lookup_ngram


# ---- one section per question ----------------------------------------------------------------------------------
def section_paper_table(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    rows = []
    for name, method in results["methods"].items():
        rate = (f"{method['fallback_rate']:.2f} / {method['rollback_rate']:.2f}"
                if method["fallback_rate"] is not None else "-")
        rows.append([method_label(name, data), speed(method["speedup"], source, base),
                     number(method["tokens_per_s"]["median"], source, base, 1), number(method["rougeL"], source, base, 1),
                     number(method["rep4"], source, base, 1), number(method["exact_match"], source, base), rate,
                     number(method["tokens_per_large_pass"], source, base),
                     "yes" if method["same_outputs_every_repeat"] else "**no**"])
    header = ["method", "speedup", "tokens/s", "ROUGE-L", "rep-4", "exact match", "fallbacks / rollbacks per token",
              "tokens per large pass", "same output every repeat"]
    return [harness_setting(results, data) + ".", ""] + table(header, rows)


section_lossless = section_paper_table


def section_sweep(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    rows = [[point["series"], f"{point['fallback_threshold']:g}", f"{point['rollback_threshold']:g}",
             number(point["quality"], source, base), speed(point["speedup"], source, base),
             number(point["rep4"], source, base, 1), number(point["tokens_per_large_pass"], source, base)]
            for point in results["points"]]
    lines = [f"{results['dataset']}, {results['n']} examples, median of {results['repeats']} repeats (min-max); "
             f"vanilla quality {results['vanilla']['quality']:.2f} ({results['metric']}).", ""]
    lines += table(["series", "alpha_FB", "alpha_RB", results["metric"], "speedup", "rep-4", "tokens per large pass"], rows)
    for series, picks in results["picks"].items():
        for key, label in (("no_loss", "with no quality loss"), ("within_1", "within one point of vanilla")):
            point = picks[key]
            pick = "none" if point is None else (
                f"alpha_FB {point['fallback_threshold']:g} / alpha_RB {point['rollback_threshold']:g}, "
                f"{speed(point['speedup'], source, base)}")
            lines.append(f"- {series}, fastest {label}: {pick}")
    plot = REPO / results["plot"] if results.get("plot") else None
    if plot is not None and plot.is_file():
        lines += ["", f"![quality against latency]({Path(os.path.relpath(plot, base)).as_posix()})"]
    return lines


def spread_cell(value: dict | None, source: Path, base: Path, digits: int = 2, unit: str = "", scale: float = 1.0) -> str:
    """A timed figure: the median (times ``scale``, with ``unit``) linked to its file, then min-max."""
    if value is None:
        return "-"
    median, low, high = (f"{value[key] * scale:.{digits}f}" for key in ("median", "min", "max"))
    return f"{link(median + unit, source, base)} ({low}-{high})"


def section_drafter_cost(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    rows = [[label, number(row["agreement"] * 100, source, base, 1, "%"), spread_cell(row["step_ms"], source, base, 1),
             spread_cell(row["cost_ratio"], source, base, 1, "%", 100)]
            for label, row in results["drafters"].items()]
    large = spread_cell(results["large_step_ms"], source, base, 1, " ms")
    return [f"Agreement on {results['heldout_records']} held-out calibration records ({results['heldout_target_tokens']} "
            f"tokens); decode step median of {results['repeats']} repeats (min-max); the large model's step: "
            f"{large}.", ""] + table(
        ["drafter", "top-1 agreement", "decode step, ms", "share of the large model's step"], rows)


def section_kernels(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    passes = results["large_pass"]["relative_to_one_token"]
    widths = list(passes["off"])
    rows = [[f"kernels {arm}"] + [number(passes[arm][width]["median"], source, base) for width in widths] for arm in passes]
    lines = [f"A large pass over k new tokens after {results['large_pass']['prefix_tokens']} cached tokens, in units of "
             f"a one-token step with the kernels off ({results['large_pass']['one_token_ms_kernels_off']:.1f} ms), "
             f"median of {results['large_pass']['rounds']} interleaved rounds:", ""]
    lines += table(["arm"] + [f"k={width}" for width in widths], rows) + [""]
    return lines + section_paper_table(source, data, base)


def section_server_load(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    servers = results.get("servers") or {"local": results["levels"]}  # files written before the Ray Serve mode
    rows = [[name, clients] + [spread_cell(row[key], source, base, digits, unit) for key, digits, unit in (
        ("requests_per_s", 2, ""), ("tokens_per_s", 1, ""), ("p50_latency_s", 2, " s"), ("p95_latency_s", 2, " s"),
        ("refused_429", 0, ""))] for name, levels in servers.items() for clients, row in levels.items()]
    return [f"{results['requests_per_level']} requests per level, queue size {results['queue_size']}, median of "
            f"{results['repeats']} repeats (min-max).", ""] + table(
        ["server", "clients", "answered requests/s", "tokens/s", "p50 latency", "p95 latency", "refused (429)"], rows)


def section_adaptive(source: Path, data: dict, base: Path) -> list[str]:
    """The overall table, then per kind: each method's speedup and throughput ratio, and the perfect lossless
    policy's ceiling with the small model's teacher-forced agreement."""
    results = data["results"]
    lines = section_paper_table(source, data, base)
    ceiling = (results.get("ceiling") or {}).get("kinds", {})
    overall = ceiling.get("overall")
    note = [f"Over all examples a perfect lossless policy would reach {overall['perfect_lossless_speedup']:.2f}x "
            f"(teacher-forced agreement {100 * overall['agreement']:.1f}%, decode cost from the engine's measured "
            f"small step and large passes, prefill left out)."] if overall else []
    kinds = results.get("kinds") or {}
    if not kinds:
        return lines + [""] + note if note else lines
    names = [name for name in next(iter(kinds.values())) if name != "vanilla"]
    header = ["kind"] + [f"{name}: speedup / tok/s ratio" for name in names] + [
        "teacher-forced agreement", "perfect lossless policy"]
    rows = []
    for kind, methods in kinds.items():
        limit = ceiling.get(kind, {})
        rows.append([kind] + [f"{speed(methods[name]['speedup'], source, base)} / "
                              f"{methods[name]['throughput_ratio']['median']:.2f}x" for name in names]
                    + [number(100 * limit["agreement"], source, base, 1, "%") if limit.get("agreement") is not None else "-",
                       number(limit.get("perfect_lossless_speedup"), source, base, 2, "x")])
    return lines + ["", "Per kind (speedup = latency ratio over the large model alone, median (min-max); tok/s ratio "
                    "= throughput ratio, median):", ""] + table(header, rows) + ([""] + note if note else [])


def section_agreement(source: Path, data: dict, base: Path) -> list[str]:
    results = data["results"]
    lines = [f"Teacher-forced top-1 agreement with the large model's greedy answers ({results['max_new_tokens']} new "
             "tokens), the drafters as the engine loads them.", ""]
    for name, dataset in results["datasets"].items():
        kinds = sorted(next(iter(dataset["drafters"].values())), key=lambda kind: kind == "overall")  # overall last
        rows = [[label] + [number(100 * row[kind]["agreement"], source, base, 1, "%") for kind in kinds]
                for label, row in dataset["drafters"].items()]
        lines += [f"{name}, {dataset['n']} prompts:", ""] + table(["drafter"] + kinds, rows) + [""]
    return lines[:-1]


SECTIONS = {"paper-table": section_paper_table, "lossless": section_lossless, "sweep": section_sweep,
            "drafter-cost": section_drafter_cost, "kernels": section_kernels, "server-load": section_server_load,
            "adaptive": section_adaptive, "agreement": section_agreement}


def results_markdown(chosen: dict, base: Path) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/results_table.py` from the files in `benchmarks/results/` (do not edit by "
             "hand). Timed figures are medians over repeats, with min-max in brackets; speedup = the large model "
             "alone's total time / the method's, over the same examples in the same run. Every figure links to its "
             "result file, whose `provenance` says where it was measured. How to run each script: "
             f"{link('README.md', BENCHMARKS / 'README.md', base)}.", "", "## Headline", ""]
    lines += headline(chosen, base)
    for question, (script, words) in QUESTIONS.items():
        lines += ["", f"## {words}", "", f"Script: {link(script, BENCHMARKS / script, base)}.", ""]
        if question not in chosen:
            lines.append(f"No result yet: `python benchmarks/{script}`.")
            continue
        for source, data in chosen[question]:
            if len(chosen[question]) > 1:
                lines += [f"### {data['results'].get('dataset', source.stem)}", ""]
            lines += SECTIONS[question](source, data, base) + ["", stamp_line(data, source, base), ""]
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: list[str]) -> str | None:
    """``text`` with the lines between the markers replaced by ``block``; None when the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[: start + len(START)] + "\n" + "\n".join(block) + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="(default: %(default)s)")
    parser.add_argument("--cited", type=Path, default=BENCHMARKS / "cited.json", help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "RESULTS.md", help="(default: %(default)s)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="(default: %(default)s)")
    parser.add_argument("--no-readme", action="store_true", help="write RESULTS.md only")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        raise BenchmarkError(f"results folder {args.results_dir} does not exist")
    chosen = choose(args.results_dir, args.cited)
    args.out.write_text(results_markdown(chosen, args.out.resolve().parent), encoding="utf-8")
    print(f"wrote {args.out} ({len(chosen)} questions)", file=sys.stderr)
    if args.no_readme:
        return 0
    text = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
    updated = replace_block(text, headline(chosen, args.readme.resolve().parent))
    if updated is None:
        print(f"{args.readme} has no '{START}' ... '{END}' lines; left it unchanged", file=sys.stderr)
    elif updated != text:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated the results table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
