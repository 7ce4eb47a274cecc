"""Which drafting form of the shipped little model makes BiLD fastest, and at what quality? An A/B in one run.

Arms (same trained weights, same examples, interleaved per example with vanilla after a warm-up):
- "int8": int8 decoder layers and an int8 head over the 8,192-token draft vocabulary (64.4% held-out agreement,
  decode step 13-17% of the large model's; benchmarks/drafting-agreement.log; shipped until this run);
- "fp32-first": the same with the first decoder layer left in fp32 (65.2%, about 15%: layer 0 alone loses 0.8 points
  of agreement in int8; benchmarks/drafting-forms.log);
- "fp32-layers": fp32 decoder layers, the same int8 draft head (65.9%, 19-20%).
The large model runs on bild's CPU kernels in both arms (what the engine does); vanilla is transformers generate on
the same large model, as in `bild eval`. The earlier question of this script (int8 head vs int8 drafting vs bild's kernels,
benchmarks/drafting-ab.log) is in git at commit ec5a452.

    python benchmarks/drafting_ab.py --limit 60 --threads 2 --max-new-tokens 64 > benchmarks/drafting-forms-ab.log

Result (2026-11-27): fp32-first and fp32-layers wrote the same tokens on all 60 examples (the layer that matters is
the first); at the paper's 0.6 / 5 / 10 they were 1.50x / 1.51x against int8's 1.39x, with half int8's rep-4, so
bild drafts with fp32 layers and the int8 draft head since then (load_little's default).
"""

from __future__ import annotations

import torch

from common import ab_parser, print_methods
from bild import BiLDConfig
from bild.decoding import BiLD
from bild.eval.datasets import load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.drafters.little import load_little
from bild.models import DEFAULT_LARGE, ModelPair, load_model
from bild.drafters.quantize import quantize_decoder_layers


def main() -> None:
    parser = ab_parser(__doc__, settings="0.6/5/10,0.1/15/10,0.2/0/1")
    parser.add_argument("--repeat-ngram", type=int, default=0, help="the repetition guard of every BiLD arm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    base = BiLDConfig(max_new_tokens=args.max_new_tokens, repeat_ngram=args.repeat_ngram)
    contexts = {}
    for arm, fp32_layers in (("int8", ()), ("fp32-first", (0,)), ("fp32-layers", tuple(range(6)))):
        little = load_little("aligned", large, int8_layers=False)  # fp32 layers, int8 draft head
        quantize_decoder_layers(little.model, keep=fp32_layers)
        pair = ModelPair(large, little)
        contexts[arm] = MethodContext(pair, BiLD(pair), base)
    methods = {"vanilla": build_method("vanilla", contexts["int8"])}
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        for arm, context in contexts.items():
            methods[f"{arm} {setting}"] = bild_method(context, fallback_threshold=float(fallback),
                                                      rollback_threshold=float(rollback), max_small_steps=int(window))
    dataset = load_dataset("docsum", limit=args.limit)
    result = run_methods(contexts["int8"].pair, contexts["int8"].engine, dataset, methods, base)
    print_methods(result, args.max_new_tokens, args.threads)


if __name__ == "__main__":
    main()
