"""Pure functions on logits: the token-picking rule both models share, and the confidence the fallback policy reads."""

from __future__ import annotations

import torch

from bild.config import SamplingConfig


def distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / temperature), then the top-p nucleus.

    logits: (..., vocab) -> probabilities (..., vocab). Greedy (temperature 0) uses plain softmax.
    """
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is below top_p: the most likely token always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def pick(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token id from logits (vocab,): argmax when greedy, else a draw from `distribution`."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = distribution(logits, sampling)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_probability(logits: torch.Tensor, sampling: SamplingConfig) -> float:
    """The model's confidence: its top-1 probability under the temperature it samples with. logits: (vocab,)."""
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    scaled = logits.float() / temperature
    return float(torch.exp(scaled.max() - torch.logsumexp(scaled, dim=-1)))


def make_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling; None for greedy decoding or an unseeded run."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator
