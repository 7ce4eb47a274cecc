"""An open-question twin of `mansum`: ask what a command does, with only its name in the prompt.

The answer is not in the prompt, so a drafter cannot copy it; this is the fairer set for the aligned-against-unaligned
question (docs/eval.md). Writes build/mansum-explain.jsonl from the mansum set (built on first use):

    python benchmarks/mansum_explain.py
    bild sweep --dataset build/mansum-explain.jsonl --prompt-template "In one sentence, what does the {source} command do?" ...
"""

from __future__ import annotations

import json
from pathlib import Path

from bild.eval.docsum import write_examples
from bild.eval.mansum import ensure_built


def main() -> None:
    rows = [json.loads(line) for line in ensure_built().read_text(encoding="utf-8").splitlines()]
    examples = [{"id": row["id"], "source": row["id"].rsplit("(", 1)[0], "reference": row["reference"]} for row in rows]
    path = Path("build/mansum-explain.jsonl")
    print(f"wrote {write_examples(path, examples)} examples to {path}")


if __name__ == "__main__":
    main()
