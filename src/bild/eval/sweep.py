"""Quality against latency over a grid of (fallback threshold, rollback threshold): the paper's Figure 4 and Table 1.

Every grid point of every small model (the "aligned" and "unaligned" series) runs interleaved per example with one
shared vanilla run, so the baseline is measured once and machine noise hits all points alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.eval.datasets import EvalDataset
from bild.eval.harness import BASELINE, EvalResult, MethodSummary, ProgressCallback, run_methods
from bild.eval.methods import Method, MethodContext, bild_method, build_method
from bild.models import LoadedModel, ModelPair

# The paper's ranges (section "Settings"): summarization alpha_FB 0.2-0.6, alpha_RB 2-6; translation 0.5-0.9, 1-10.
SUMMARIZATION_GRID = ((0.2, 0.3, 0.4, 0.5, 0.6), (2.0, 3.0, 4.0, 5.0, 6.0))
TRANSLATION_GRID = ((0.5, 0.6, 0.7, 0.8, 0.9), (1.0, 2.0, 3.0, 5.0, 10.0))
QUALITY_TOLERANCE = 1.0  # the paper's "~1 point loss" column


def default_grid(metric: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return TRANSLATION_GRID if metric == "bleu" else SUMMARIZATION_GRID


@dataclass(frozen=True)
class SweepPoint:
    series: str  # e.g. "aligned"
    small: str  # the small model's name
    fallback_threshold: float
    rollback_threshold: float
    quality: float | None  # the dataset's metric (ROUGE-L or BLEU, 0-100)
    normalized_latency: float  # method time / vanilla time (the paper's x axis)
    speedup: float
    summary: MethodSummary


@dataclass(frozen=True)
class SweepResult:
    dataset: str
    metric: str
    large: str
    vanilla: MethodSummary
    vanilla_quality: float | None
    points: tuple[SweepPoint, ...]
    n: int  # examples every point ran on
    interrupted: bool

    def picks(self, series: str) -> dict[str, SweepPoint | None]:
        """Table 1: the fastest point with no quality loss and the fastest within one point of vanilla."""
        candidates = [point for point in self.points if point.series == series and point.quality is not None]
        if self.vanilla_quality is None:
            return {"no_loss": None, "within_1": None}

        def fastest(tolerance: float) -> SweepPoint | None:
            good = [point for point in candidates if point.quality >= self.vanilla_quality - tolerance]
            return max(good, key=lambda point: point.speedup, default=None)

        return {"no_loss": fastest(0.0), "within_1": fastest(QUALITY_TOLERANCE)}

    def series_names(self) -> list[str]:
        return list(dict.fromkeys(point.series for point in self.points))

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "n": self.n,
            "metric": self.metric,
            "large": self.large,
            "vanilla": {"quality": self.vanilla_quality, **asdict(self.vanilla)},
            "points": [_point_json(point) for point in self.points],
            "picks": {
                series: {key: _point_json(point) if point else None for key, point in self.picks(series).items()}
                for series in self.series_names()
            },
            "interrupted": self.interrupted,
        }


def _point_json(point: SweepPoint) -> dict:
    data = asdict(point)
    summary = data.pop("summary")
    return {**data, **{key: value for key, value in summary.items() if key not in data}}


def point_label(series: str, fallback_threshold: float, rollback_threshold: float) -> str:
    return f"{series} fb={fallback_threshold:g} rb={rollback_threshold:g}"


def run_sweep(
    large: LoadedModel,
    smalls: dict[str, LoadedModel],
    dataset: EvalDataset,
    fallback_thresholds: tuple[float, ...],
    rollback_thresholds: tuple[float, ...],
    config: BiLDConfig,
    out_dir: Path | None = None,
    warmup: int = 1,
    chat: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[SweepResult, EvalResult]:
    """Run vanilla once and every (series, alpha_FB, alpha_RB) point, interleaved per example."""
    if not smalls:
        raise ValueError("a sweep needs at least one small model")
    methods: dict[str, Method] = {}
    grid: dict[str, tuple[str, str, float, float]] = {}  # label -> (series, small name, fb, rb)
    first_engine = None
    for series, small in smalls.items():
        pair = ModelPair(large=large, small=small)
        engine = BiLD(pair)
        context = MethodContext(pair=pair, engine=engine, config=config)
        if first_engine is None:
            first_engine, first_pair = engine, pair
            methods[BASELINE] = build_method(BASELINE, context)
        for fallback in fallback_thresholds:
            for rollback in rollback_thresholds:
                label = point_label(series, fallback, rollback)
                methods[label] = bild_method(context, fallback_threshold=fallback, rollback_threshold=rollback)
                grid[label] = (series, small.name, fallback, rollback)
    evaluation = run_methods(first_pair, first_engine, dataset, methods, config, out_dir, warmup, chat, on_progress)
    vanilla = evaluation.summaries[BASELINE]
    points = tuple(
        SweepPoint(
            series=series,
            small=small_name,
            fallback_threshold=fallback,
            rollback_threshold=rollback,
            quality=_quality(evaluation.summaries[label], dataset.metric),
            normalized_latency=evaluation.summaries[label].time_s / vanilla.time_s if vanilla.time_s else 0.0,
            speedup=evaluation.summaries[label].speedup,
            summary=evaluation.summaries[label],
        )
        for label, (series, small_name, fallback, rollback) in grid.items()
    )
    result = SweepResult(
        dataset=dataset.name,
        metric=dataset.metric,
        large=large.name,
        vanilla=vanilla,
        vanilla_quality=_quality(vanilla, dataset.metric),
        points=points,
        n=evaluation.n,
        interrupted=evaluation.interrupted,
    )
    return result, evaluation


def _quality(summary: MethodSummary, metric: str) -> float | None:
    return summary.rougeL if metric == "rougeL" else summary.bleu


def plot(result: SweepResult, path: Path, title: str | None = None) -> None:
    """Figure 4 of the paper: quality against latency normalized by vanilla, one marker per grid point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for series, marker in zip(result.series_names(), "os^Dv"):
        points = [point for point in result.points if point.series == series and point.quality is not None]
        axes.scatter(
            [point.normalized_latency for point in points], [point.quality for point in points],
            marker=marker, label=f"BiLD {series}", alpha=0.8,
        )
    if result.vanilla_quality is not None:
        axes.axhline(result.vanilla_quality, color="black", linestyle="-", linewidth=1, label="vanilla")
        axes.axhline(result.vanilla_quality - QUALITY_TOLERANCE, color="gray", linestyle="--", linewidth=1, label="vanilla - 1")
        axes.scatter([1.0], [result.vanilla_quality], marker="*", s=150, color="black", zorder=3)
    axes.set_xlabel("latency normalized by vanilla (lower is faster)")
    axes.set_ylabel({"rougeL": "ROUGE-L", "bleu": "BLEU"}.get(result.metric, result.metric))
    axes.set_title(title or f"{result.dataset}: quality vs latency ({result.large})")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial)
    partial.replace(path)
