"""Prediction alignment (BiLD section "Prediction alignment"): fine-tune the small model on the large model's outputs.

Three steps, each usable alone:
1. :func:`generate_calibration` - the large model's greedy outputs for a list of inputs, batched, written to a JSONL
   one batch at a time (an interrupted run resumes where it stopped), with the large model's top-k log-probs at every
   generated position for optional token-level distillation.
2. :func:`finetune` - sequence-level distillation (cross-entropy on the large model's greedy tokens), plus an optional
   soft cross-entropy on the stored top-k distribution (``kl_weight``).
3. :func:`align` - both steps plus a held-out agreement measurement before and after, the saved model and a report.

Works for decoder-only (prompt and output in one sequence) and encoder-decoder pairs (source in the encoder, output in
the decoder).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bild.devices import input_device
from bild.models import LoadedModel, check_same_vocabulary

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions without a loss (prompt, padding)


class AlignInputError(ValueError):
    """The alignment input (file, records or model pair) is unusable; the message says what and what is allowed."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How the large model produces calibration data."""

    max_new_tokens: int = 96  # length cap of each greedy output
    batch_size: int = 8  # prompts per generate() call (left-padded for decoder-only models)
    top_k: int = 16  # log-probs of the large model's k best tokens kept per position (0: none)
    max_input_tokens: int = 384  # longer prompts are cut from the left (decoder-only) or right (encoder-decoder)


@dataclass(frozen=True)
class TrainConfig:
    """How the small model is fine-tuned."""

    epochs: float = 1.0  # passes over the training records (fractions allowed)
    batch_size: int = 8  # sequences per optimizer step
    learning_rate: float = 3e-4  # AdamW peak; linear warm-up then cosine decay to 10%
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    kl_weight: float = 0.0  # weight of the soft cross-entropy on the large model's stored top-k (token-level KD)
    max_prompt_tokens: int = 256  # prompt tokens kept as context (cut from the left)
    max_target_tokens: int = 96  # target tokens trained on per record
    freeze_embeddings: bool = True  # the input embeddings (and a tied head) stay as they are
    seed: int = 0
    max_minutes: float | None = None  # safety stop on a busy machine: end training early (the report says so)
    length_bucket: int = 0  # > 0: sort each run of this many shuffled records by length before cutting batches


@dataclass(frozen=True)
class CalibrationRecord:
    """One input and the large model's greedy output for it."""

    index: int  # position of the input in the input list (the resume key)
    prompt: str
    input_ids: list[int]  # tokenized prompt (chat template applied) or encoder source
    output_ids: list[int]  # the large model's greedy tokens, up to and including the first EOS
    topk_ids: list[list[int]] = field(default_factory=list)  # (len(output_ids), top_k)
    topk_logprobs: list[list[float]] = field(default_factory=list)  # (len(output_ids), top_k)
    # the tokens read after the input when they are not output_ids: token-level distillation on raw text reads the
    # real text, and output_ids are the large model's top-1 predictions along it (:func:`distillation_records`)
    read_ids: list[int] = field(default_factory=list)

    @property
    def reads(self) -> list[int]:
        """What the model reads after the input: target i is predicted from input_ids + reads[:i]."""
        return self.read_ids or self.output_ids


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_tokens: int  # target tokens seen, summed over steps
    first_loss: float  # mean loss over the first 10 steps
    final_loss: float  # mean loss over the last 10 steps
    seconds: float


@dataclass(frozen=True)
class AlignReport:
    """What `bild align` did, saved as JSON next to the model."""

    train_records: int
    heldout_records: int
    train_target_tokens: int
    heldout_target_tokens: int
    steps: int
    first_loss: float
    final_loss: float
    train_seconds: float
    agreement_before: float  # top-1 agreement with the large model's greedy tokens on held-out records
    agreement_after: float
    kl_weight: float
    calibration_file: str
    output_dir: str | None


# ---------------------------------------------------------------------------------------------------- inputs


def read_inputs(path: str | Path) -> list[str]:
    """Prompts from a JSONL file (field ``prompt`` or ``source``) or a plain-text file (one per non-empty line)."""
    path = Path(path)
    if path.is_dir():
        raise AlignInputError(f"input file {str(path)!r} is a directory; give a JSONL or text file")
    if not path.is_file():
        raise AlignInputError(f"input file {str(path)!r} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise AlignInputError(f"input file {str(path)!r} is empty: give one prompt per line or JSONL with 'prompt'")
    if path.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        return [_prompt_field(line, path, number) for number, line in enumerate(lines, 1)]
    return [line.replace("\\n", "\n") for line in lines]


def _prompt_field(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise AlignInputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    text = row.get("prompt", row.get("source")) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise AlignInputError(f"{path}:{number}: each JSONL row needs a non-empty string field 'prompt' or 'source'")
    return text


def encode_prompt(model: LoadedModel, prompt: str, max_tokens: int) -> list[int]:
    """Token ids the model sees for a prompt: the chat template for chat models, plain tokens otherwise."""
    tokenizer = model.tokenizer
    if model.is_chat and not model.is_encoder_decoder:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    return ids[:max_tokens] if model.is_encoder_decoder else ids[-max_tokens:]


# ---------------------------------------------------------------------------------------------------- calibration


def read_calibration(path: str | Path) -> list[CalibrationRecord]:
    """Records of a calibration JSONL, in file order; a torn last line (interrupted write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(CalibrationRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            logger.warning("ignoring an unreadable line in %s (interrupted write?)", path)
    return records


def generate_calibration(
    large: LoadedModel, prompts: Sequence[str], out_path: str | Path, config: CalibrationConfig = CalibrationConfig()
) -> list[CalibrationRecord]:
    """Greedy outputs of the large model for every prompt, appended to ``out_path`` batch by batch (resumable).

    Prompts are batched in order of token length (less padding); records already in ``out_path`` are skipped.
    Returns all records, sorted by input index.
    """
    if not prompts:
        raise AlignInputError("no prompts to generate calibration data from")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(out_path)
    done = {record.index: record for record in read_calibration(out_path) if record.index < len(prompts)}
    stale = [index for index, record in done.items() if record.prompt != prompts[index]]
    if stale:
        raise AlignInputError(
            f"{out_path} was made for other prompts ({len(stale)} records differ from the prompt at their index, "
            f"the first at index {stale[0]}; another input file, or another Python's stdlib docstrings): move it "
            "away or choose another work directory")
    encoded = [(i, encode_prompt(large, p, config.max_input_tokens)) for i, p in enumerate(prompts) if i not in done]
    encoded = _length_sorted_windows(encoded, window=16 * config.batch_size)
    if done:
        logger.info("resuming calibration: %d of %d already in %s", len(done), len(prompts), out_path)
    with out_path.open("a", encoding="utf-8") as sink, tqdm(total=len(prompts), initial=len(done), desc="calibration") as bar:
        for start in range(0, len(encoded), config.batch_size):
            batch = encoded[start : start + config.batch_size]
            for record in _generate_batch(large, [(i, prompts[i], ids) for i, ids in batch], config):
                sink.write(json.dumps(asdict(record)) + "\n")
                done[record.index] = record
            sink.flush()
            bar.update(len(batch))
    return [done[i] for i in sorted(done)]


def distillation_records(large: LoadedModel, texts: Iterable[str], chunks: int, chunk_tokens: int = 128,
                         top_k: int = 16, batch_size: int = 16) -> list[CalibrationRecord]:
    """Token-level distillation data on raw text: the first ``chunks`` pieces of ``chunk_tokens`` tokens cut from
    ``texts`` (in order; a text's last piece when it has at least 16 tokens), each read by the large model in one
    teacher-forced pass (:func:`teacher_forced_records`). Decoder-only models."""
    pieces: list[list[int]] = []
    for text in texts:
        ids = large.tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces.extend(ids[start : start + chunk_tokens] for start in range(0, len(ids), chunk_tokens)
                      if len(ids) - start >= 16)
        if len(pieces) >= chunks:
            break
    if not pieces:
        raise AlignInputError("no raw text to distil on (every text is shorter than 16 tokens)")
    return teacher_forced_records(large, [(piece[:1], piece[1:]) for piece in pieces[:chunks]], top_k, batch_size)


@torch.inference_mode()
def teacher_forced_records(large: LoadedModel, texts: Sequence[tuple[list[int], list[int]]], top_k: int = 16,
                           batch_size: int = 16) -> list[CalibrationRecord]:
    """Token-level distillation data: for each (input ids, text ids), a record that reads the real text
    (``read_ids``) after the input and whose targets are the large model's top-1 predictions along it (``output_ids``,
    with the top-k log-probs), all from one teacher-forced pass per batch. The little model learns what the large one
    would write next on any text, without the cost of generating it. Decoder-only models."""
    if large.is_encoder_decoder:
        raise AlignInputError("distillation on raw text is for decoder-only models")
    device = input_device(large.model)
    records = []
    for start in tqdm(range(0, len(texts), batch_size), desc="distillation targets", unit="batch"):
        batch = texts[start : start + batch_size]
        input_ids, mask = _pad([context + text for context, text in batch], _pad_id(large), left=False)
        logprobs = large.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        top_values, top_ids = logprobs.log_softmax(-1).topk(max(1, top_k), dim=-1)  # (batch, length, top_k)
        for row, (context, text) in enumerate(batch):
            # the predictions after the input and after each text token but the last (nothing to read it against)
            window = slice(len(context) - 1, len(context) + len(text) - 1)
            stored = _stored_topk(top_values[row, window], top_ids[row, window]) if top_k > 0 else {}
            records.append(CalibrationRecord(index=start + row, prompt="", input_ids=context,
                                             output_ids=top_ids[row, window, 0].tolist(), read_ids=text, **stored))
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that an interrupted write left without its newline, so appending starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
        logger.warning("dropped a torn last line of %s (interrupted write)", path)


def _length_sorted_windows(encoded: list[tuple[int, list[int]]], window: int) -> list[tuple[int, list[int]]]:
    """Sort by length inside consecutive windows: little padding, and a stopped run has covered roughly a prefix."""
    result = []
    for start in range(0, len(encoded), window):
        result.extend(sorted(encoded[start : start + window], key=lambda item: (len(item[1]), item[0])))
    return result


@torch.inference_mode()
def _generate_batch(
    large: LoadedModel, batch: list[tuple[int, str, list[int]]], config: CalibrationConfig
) -> list[CalibrationRecord]:
    input_ids, attention_mask = _pad([ids for _, _, ids in batch], _pad_id(large), left=not large.is_encoder_decoder)
    device = input_device(large.model)  # the large model stays where it was loaded; its inputs go there
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    out = large.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        pad_token_id=_pad_id(large),
        eos_token_id=list(large.eos_token_ids),
        output_logits=config.top_k > 0,
        return_dict_in_generate=True,
    )
    offset = 1 if large.is_encoder_decoder else input_ids.shape[1]  # decoder start token / the prompt
    generated = out.sequences[:, offset:]  # (batch, new_tokens)
    if config.top_k > 0:
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (batch, new_tokens, vocab)
        top_values, top_ids = logprobs.topk(config.top_k, dim=-1)  # (batch, new_tokens, top_k)
    records = []
    for row, (index, prompt, ids) in enumerate(batch):
        length = _output_length(generated[row].tolist(), large.eos_token_ids)
        records.append(
            CalibrationRecord(
                index=index,
                prompt=prompt,
                input_ids=ids,
                output_ids=generated[row, :length].tolist(),
                **(_stored_topk(top_values[row, :length], top_ids[row, :length]) if config.top_k > 0 else {}),
            )
        )
    return records


def _stored_topk(values: torch.Tensor, ids: torch.Tensor) -> dict[str, list]:
    """A record's top-k fields from (positions, k) log-probs and token ids, the log-probs rounded for storage."""
    logprobs = [[round(value, 3) for value in position] for position in values.tolist()]
    return {"topk_ids": ids.tolist(), "topk_logprobs": logprobs}


def _output_length(tokens: list[int], eos_ids: Sequence[int]) -> int:
    """Tokens up to and including the first EOS (the rest is padding)."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return position + 1
    return len(tokens)


def _pad_id(model: LoadedModel) -> int:
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return model.eos_token_ids[0] if model.eos_token_ids else 0


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one (batch, max_len) tensor and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Model inputs for teacher-forced training or scoring; targets are the tokens each kept position must predict."""

    inputs: dict[str, torch.Tensor]  # keyword arguments of model.forward
    keep: torch.Tensor | None  # decoder-only: sequence positions whose logits predict the targets, (target_len,)
    targets: torch.Tensor  # (batch, target_len), IGNORE where there is no target
    topk_ids: torch.Tensor | None  # (batch, target_len, top_k) the large model's best tokens, or None
    topk_logprobs: torch.Tensor | None  # (batch, target_len, top_k)


def make_batch(model: LoadedModel, records: Sequence[CalibrationRecord], config: TrainConfig) -> Batch:
    """Teacher-forced inputs: decoder-only rows are [pad, prompt | target, pad] with every prompt ending at one column."""
    contexts = [record.input_ids[-config.max_prompt_tokens :] if not model.is_encoder_decoder
                else record.input_ids[: config.max_prompt_tokens] for record in records]
    targets = [record.output_ids[: config.max_target_tokens] for record in records]
    reads = [record.reads[: config.max_target_tokens] for record in records]
    target_len = max(len(t) for t in targets)
    target_ids, _ = _pad(targets, IGNORE, left=False)  # (batch, target_len)
    topk_ids, topk_logprobs = _topk_tensors(records, target_len, config)
    pad_id = _pad_id(model)
    if model.is_encoder_decoder:
        start = model.model.config.decoder_start_token_id
        source, source_mask = _pad(contexts, pad_id, left=False)
        decoder_ids, _ = _pad([[start] + r[:-1] for r in reads], pad_id, left=False)
        inputs = {"input_ids": source, "attention_mask": source_mask, "decoder_input_ids": decoder_ids}
        return Batch(inputs, None, target_ids, topk_ids, topk_logprobs)
    prompt_len = max(len(c) for c in contexts)
    left, left_mask = _pad(contexts, pad_id, left=True)  # (batch, prompt_len)
    right, right_mask = _pad([r[:-1] if len(r) > 1 else [pad_id] for r in reads], pad_id, left=False)
    right_mask[[i for i, t in enumerate(targets) if len(t) <= 1], :] = 0
    input_ids = torch.cat([left, right], dim=1)  # (batch, prompt_len + target_len - 1 or so)
    mask = torch.cat([left_mask, right_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(prompt_len - 1, prompt_len - 1 + target_len)
    if input_ids.shape[1] < keep[-1] + 1:  # every target has length 1: no target-side input columns needed
        keep = keep[: input_ids.shape[1] - prompt_len + 1]
        target_ids = target_ids[:, : keep.numel()]
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    return Batch(inputs, keep, target_ids, topk_ids, topk_logprobs)


def _topk_tensors(
    records: Sequence[CalibrationRecord], target_len: int, config: TrainConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The stored top-k of each record, padded; a record without one (calibration data stored without top-k beside
    data with it) gets no soft targets: its rows of ``logprobs`` stay -inf, which :func:`batch_loss` leaves out."""
    with_topk = [record for record in records if record.topk_ids]
    if config.kl_weight == 0 or not with_topk:
        return None, None
    top_k = len(with_topk[0].topk_ids[0])
    ids = torch.zeros((len(records), target_len, top_k), dtype=torch.long)
    logprobs = torch.full((len(records), target_len, top_k), -math.inf)
    for row, record in enumerate(records):
        if not record.topk_ids:
            continue
        length = min(len(record.topk_ids), target_len)
        ids[row, :length] = torch.tensor(record.topk_ids[:length])
        logprobs[row, :length] = torch.tensor(record.topk_logprobs[:length])
    return ids, logprobs


def batch_logits(model: LoadedModel, batch: Batch) -> torch.Tensor:
    """Logits at the target positions only (the head is the costly part): (batch, target_len, vocab)."""
    device = input_device(model.model)
    inputs = {name: tensor.to(device) for name, tensor in batch.inputs.items()}
    if batch.keep is None:
        return model.model(**inputs).logits
    return model.model(**inputs, logits_to_keep=batch.keep.to(device)).logits


def batch_loss(logits: torch.Tensor, batch: Batch, kl_weight: float) -> torch.Tensor:
    """Cross-entropy on the targets, plus ``kl_weight`` x soft cross-entropy on the large model's renormalized top-k."""
    targets = batch.targets.to(logits.device)
    valid = targets != IGNORE  # (batch, target_len)
    loss = F.cross_entropy(logits[valid].float(), targets[valid])
    if kl_weight > 0 and batch.topk_ids is not None:
        teacher_logprobs = batch.topk_logprobs.to(logits.device)  # (batch, target_len, top_k)
        soft = valid & (teacher_logprobs[..., 0] > -math.inf)  # target positions with a stored top-k
        if soft.any():
            student = logits.float().log_softmax(-1).gather(-1, batch.topk_ids.to(logits.device))
            teacher = teacher_logprobs[soft].softmax(-1)  # renormalized over the k kept tokens
            loss = loss + kl_weight * -(teacher * student[soft]).sum(-1).mean()
    return loss


# ---------------------------------------------------------------------------------------------------- training


def _batches(records: Sequence[CalibrationRecord], batch_size: int, rng: random.Random, steps: int,
             length_bucket: int = 0) -> Iterator[list]:
    """``steps`` batches drawn epoch by epoch from shuffled records.

    ``length_bucket`` > 0: each epoch's shuffled order is cut into runs of that many records, each run is sorted by
    (prompt, target) length and cut into batches, and the epoch's batches are shuffled. Rows of a batch then have
    similar lengths, so less of each step is spent on padding (about a quarter less on the little models'
    calibration data at 128), and every record is still seen once per epoch (the last batch of a run may be short).
    """
    if length_bucket > 0:
        queue: list[list[int]] = []
        for _ in range(steps):
            if not queue:
                queue = _bucketed_epoch(records, batch_size, rng, length_bucket)
            yield [records[i] for i in queue.pop()]
        return
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(records)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chunk, order = order[:batch_size], order[batch_size:]
        yield [records[i] for i in chunk]


def _bucketed_epoch(records: Sequence[CalibrationRecord], batch_size: int, rng: random.Random,
                    length_bucket: int) -> list[list[int]]:
    """One epoch as batches of record indices with similar lengths, in random order."""
    fresh = list(range(len(records)))
    rng.shuffle(fresh)
    batches = []
    for start in range(0, len(fresh), length_bucket):
        run = sorted(fresh[start : start + length_bucket],
                     key=lambda i: (len(records[i].input_ids), len(records[i].output_ids)))
        batches.extend(run[k : k + batch_size] for k in range(0, len(run), batch_size))
    rng.shuffle(batches)
    return batches


def trainable_parameters(model: LoadedModel, freeze_embeddings: bool) -> list[torch.nn.Parameter]:
    if freeze_embeddings:
        model.model.get_input_embeddings().weight.requires_grad_(False)  # a tied head is the same tensor
    return [p for p in model.model.parameters() if p.requires_grad]


def finetune(small: LoadedModel, records: Sequence[CalibrationRecord], config: TrainConfig = TrainConfig()) -> TrainResult:
    """Fine-tune ``small`` in place on the records' targets (AdamW, warm-up + cosine); returns the loss curve ends."""
    if not records:
        raise AlignInputError("no training records")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    steps = max(1, math.ceil(config.epochs * len(records) / config.batch_size))
    params = trainable_parameters(small, config.freeze_embeddings)
    optimizer, schedule = make_optimizer(params, config, steps)
    small.model.train()
    losses, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(_batches(records, config.batch_size, rng, steps, config.length_bucket), total=steps, desc="fine-tune")
    for batch_records in bar:
        if config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes:
            logger.warning("stopping after %d of %d steps: the %.0f-minute limit was reached", len(losses), steps,
                           config.max_minutes)
            break
        batch = make_batch(small, batch_records, config)
        loss = batch_loss(batch_logits(small, batch), batch, config.kl_weight)
        optimizer_step(loss, params, optimizer, schedule)
        losses.append(loss.item())
        tokens += int((batch.targets != IGNORE).sum())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    small.model.eval()
    logger.info("fine-tuned %d steps in %.0f s, loss %.3f -> %.3f", len(losses), time.perf_counter() - started,
                _mean(losses[:10]), _mean(losses[-10:]))
    return TrainResult(len(losses), tokens, _mean(losses[:10]), _mean(losses[-10:]), time.perf_counter() - started)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW at the config's peak rate, linear warm-up then cosine decay to 10% over ``steps``."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, steps))


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward, clip the gradient norm to 1, step, advance the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@torch.inference_mode()
def agreement(model: LoadedModel, records: Sequence[CalibrationRecord], config: TrainConfig = TrainConfig(),
              batch_size: int = 8) -> float:
    """Teacher-forced top-1 agreement: the share of target tokens that are the model's argmax given the prefix."""
    if not records:
        raise AlignInputError("no records to measure agreement on")
    scoring = TrainConfig(**{**asdict(config), "kl_weight": 0.0})
    hits = total = 0
    for start in range(0, len(records), batch_size):
        batch = make_batch(model, records[start : start + batch_size], scoring)
        predicted = batch_logits(model, batch).argmax(-1).cpu()  # (batch, target_len)
        valid = batch.targets != IGNORE
        hits += int((predicted == batch.targets)[valid].sum())
        total += int(valid.sum())
    return hits / total


# ---------------------------------------------------------------------------------------------------- the whole step


def split_records(records: Sequence[CalibrationRecord], heldout_fraction: float, seed: int = 0
                  ) -> tuple[list[CalibrationRecord], list[CalibrationRecord]]:
    """A seeded (train, held-out) split; the held-out part is at least one record."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    heldout = max(1, int(round(heldout_fraction * len(shuffled))))
    return shuffled[heldout:], shuffled[:heldout]


def align(
    large: LoadedModel,
    small: LoadedModel,
    prompts: Sequence[str],
    work_dir: str | Path,
    out_dir: str | Path | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),
    train: TrainConfig = TrainConfig(),
    heldout_fraction: float = 0.1,
) -> AlignReport:
    """Prediction alignment end to end: calibration data -> fine-tuning -> saved model and ``align-report.json``."""
    check_same_vocabulary(large, small)
    work_dir = Path(work_dir)
    records = generate_calibration(large, prompts, work_dir / "calibration.jsonl", calibration)
    records = [record for record in records if record.output_ids]
    if len(records) < 2:
        raise AlignInputError(f"need at least 2 calibration records with output, got {len(records)}")
    train_records, heldout = split_records(records, heldout_fraction, train.seed)
    before = agreement(small, heldout, train)
    result = finetune(small, train_records, train)
    after = agreement(small, heldout, train)
    report = AlignReport(
        train_records=len(train_records),
        heldout_records=len(heldout),
        train_target_tokens=sum(min(len(r.output_ids), train.max_target_tokens) for r in train_records),
        heldout_target_tokens=sum(min(len(r.output_ids), train.max_target_tokens) for r in heldout),
        steps=result.steps,
        first_loss=result.first_loss,
        final_loss=result.final_loss,
        train_seconds=result.seconds,
        agreement_before=before,
        agreement_after=after,
        kl_weight=train.kl_weight,
        calibration_file=str(work_dir / "calibration.jsonl"),
        output_dir=str(out_dir) if out_dir is not None else None,
    )
    logger.info("agreement with the large model on %d held-out records: %.3f -> %.3f", len(heldout), before, after)
    if out_dir is not None:
        save_aligned(small, report, out_dir)
    return report


def save_aligned(small: LoadedModel, report: AlignReport, out_dir: str | Path) -> None:
    """The aligned small model and tokenizer in transformers' format, with ``align-report.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    small.model.save_pretrained(out_dir)
    small.tokenizer.save_pretrained(out_dir)
    (out_dir / "align-report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
