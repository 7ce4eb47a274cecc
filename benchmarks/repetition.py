"""ROUGE-L and repetition (seq-rep-4) per method, from the per-example rows `bild eval` / `bild sweep` write.

Runs made before `bild eval` reported repetition keep their outputs in OUT_DIR/examples.jsonl; this reads them:

    python benchmarks/repetition.py benchmarks/docsum-sweep-60/examples.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bild.eval import metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", type=Path, help="an examples.jsonl written by bild eval or bild sweep")
    args = parser.parse_args()
    outputs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in args.examples.read_text().splitlines():
        row = json.loads(line)
        outputs[row["method"]].append((row["output"], row["reference"]))
    print(f"{'method':28s} {'n':>4s} {'ROUGE-L':>8s} {'rep-4':>6s}")
    for method, rows in outputs.items():
        predictions, references = [p for p, _ in rows], [r for _, r in rows]
        print(f"{method:28s} {len(rows):4d} {metrics.rouge_l(predictions, references):8.2f} "
              f"{metrics.repetition(predictions):6.1f}")


if __name__ == "__main__":
    main()
