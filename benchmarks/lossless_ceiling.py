"""How fast can lossless BiLD (alpha_RB = 0) be with this little model on this machine? A model, then a check.

With alpha_RB = 0 the accepted text is exactly the large model's greedy output, so every cycle of the loop is
decided by two things per output position: the little model's top-1 probability (does it draft or fall back?) and
whether its top-1 token is the large model's (is the draft kept?). Both come from one teacher-forced pass of the little
model over the large model's greedy outputs. Playing the loop over them with the measured costs (a large pass over
k tokens, a little step) predicts tokens per large pass and the speedup for every (alpha_FB, N) without running it;
`bild eval --methods vanilla,bild-lossless` then checks a chosen point.

    python benchmarks/lossless_ceiling.py --limit 30 --threads 2 > benchmarks/lossless-ceiling.log
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from common import measure_pass_ms
from bild import BiLD, BiLDConfig, load_pair
from bild.train.align import CalibrationRecord, batch_logits, make_batch
from bild.eval.datasets import load_dataset
from bild.train.little import LittleConfig

PASS_WIDTHS = range(1, 12)  # a lossless cycle's large pass covers the drafts plus the token before them


@dataclass(frozen=True)
class Position:
    small_confidence: float  # the little model's top-1 probability at this output position
    small_is_right: bool  # its top-1 token is the large model's greedy token


@dataclass(frozen=True)
class Prediction:
    tokens_per_large_pass: float
    speedup: float  # over the large model writing one token per pass


def simulate_lossless(outputs: list[list[Position]], fallback_threshold: float, max_small_steps: int,
                      pass_ms: dict[int, float], small_ms: float) -> Prediction:
    """Play BiLD's loop with alpha_RB = 0 over known positions; cost = little steps + one large pass per cycle."""
    tokens = passes = 0
    cost_ms = 0.0
    for positions in outputs:
        start = 0
        while start < len(positions):
            drafted = small_steps = 0
            while drafted < max_small_steps and start + drafted < len(positions):
                small_steps += 1
                if positions[start + drafted].small_confidence < fallback_threshold:
                    break  # fallback: this step's token is dropped
                drafted += 1
            accepted = 0
            while accepted < drafted and positions[start + accepted].small_is_right:
                accepted += 1
            written = min(accepted + 1, len(positions) - start)  # the large pass adds (or replaces with) its token
            start += written
            tokens += written
            passes += 1
            cost_ms += small_steps * small_ms + pass_ms[drafted + 1]
    return Prediction(tokens / passes, pass_ms[1] * tokens / cost_ms)


def teacher_forced_positions(engine: BiLD, prompts: list[str], max_new_tokens: int) -> list[list[Position]]:
    """The large model's greedy outputs, and the little model's confidence and hit at each of their positions."""
    small = engine.pair.small
    outputs = []
    for prompt in prompts:
        prompt_ids = engine.encode(prompt)
        output_ids = engine.vanilla_ids(prompt_ids, BiLDConfig(max_new_tokens=max_new_tokens)).token_ids
        batch = make_batch(small, [CalibrationRecord(0, "", prompt_ids, output_ids)], LittleConfig().train)
        with torch.no_grad():
            small_probs = batch_logits(small, batch).float().softmax(-1)[0]  # (output_len, vocab)
        confidence, top = small_probs.max(-1)
        hits = top == batch.targets[0]
        outputs.append([Position(c, h) for c, h in zip(confidence.tolist(), hits.tolist())])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=30, help="docsum examples (default: %(default)s)")
    parser.add_argument("--small", default="smollm2-little")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = BiLD(load_pair(small=args.small))
    as_loaded = {"as loaded": lambda: None}
    pass_ms = measure_pass_ms(engine.pair.large.model, PASS_WIDTHS, as_loaded)["as loaded"]
    small_ms = measure_pass_ms(engine.pair.small.model, range(1, 2), as_loaded)["as loaded"][1]
    print("large pass over k tokens, ms (median of 7, interleaved): "
          + ", ".join(f"k={k}: {ms:.1f} ({ms / pass_ms[1]:.2f}x)" for k, ms in pass_ms.items()))
    print(f"little step: {small_ms:.1f} ms ({small_ms / pass_ms[1]:.1%} of a one-token large pass)")

    docsum = load_dataset("docsum", limit=args.limit)
    outputs = teacher_forced_positions(engine, [docsum.prompt(e) for e in docsum.examples], args.max_new_tokens)
    positions = [position for output in outputs for position in output]
    sure = [position for position in positions if position.small_confidence >= 0.6]
    print(f"docsum, {len(outputs)} examples, {len(positions)} output tokens: little model agrees on "
          f"{sum(p.small_is_right for p in positions) / len(positions):.1%}; sure (>= 0.6) on "
          f"{len(sure) / len(positions):.1%}, right on {sum(p.small_is_right for p in sure) / max(1, len(sure)):.1%} "
          "of those")
    windows = (1, 2, 3, 4, 6, 10)
    print("predicted lossless speedup (tokens per large pass), rows alpha_FB, columns N")
    print("alpha_FB  " + "  ".join(f"{f'N {n}':>13}" for n in windows))
    for fallback_threshold in (0.0, 0.2, 0.4, 0.6, 0.8):
        cells = []
        for window in windows:
            prediction = simulate_lossless(outputs, fallback_threshold, window, pass_ms, small_ms)
            cells.append(f"{prediction.speedup:5.2f}x ({prediction.tokens_per_large_pass:4.2f})")
        print(f"{fallback_threshold:8.1f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
