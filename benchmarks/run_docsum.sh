#!/bin/sh
# The benchmark in docs/eval.md: the default pair on the built-in docsum set, then a threshold sweep with the aligned
# and unaligned little models. One torch thread by default (THREADS=2 on a quiet machine); methods interleaved per example.
set -e
cd "$(dirname "$0")/.."
BILD=.venv/bin/bild
$BILD eval --dataset docsum --limit "${LIMIT:-30}" --max-new-tokens 48 --threads "${THREADS:-1}" \
  --methods vanilla,bild,bild-lossless,hf-assisted,speculative,small,bild-no-rollback,bild-no-fallback,vanilla-loop,bild-early-exit \
  --json-out benchmarks/docsum-eval.json --out-dir benchmarks/docsum-eval > benchmarks/docsum-eval.log
$BILD sweep --dataset docsum --limit "${SWEEP_LIMIT:-10}" --max-new-tokens 48 --threads "${THREADS:-1}" \
  --small smollm2-little --small-unaligned smollm2-little-unaligned \
  --fallback-thresholds "${FB:-0.2,0.4,0.6}" --rollback-thresholds "${RB:-2,4,6}" \
  --json-out benchmarks/docsum-sweep.json --out-dir benchmarks/docsum-sweep > benchmarks/docsum-sweep.log
