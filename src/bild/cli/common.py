"""What every subcommand shares: usage errors, the model, device and decoding flags, threads, loading the engine."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from bild.config import BiLDConfig, DraftCosts, SamplingConfig
from bild.devices import DEVICE_CHOICES, DTYPES, Placement, PlacementError, placement, resolve_device
from bild.models import DEFAULT_LARGE, DEFAULT_SMALL


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser, small_default: str | None = DEFAULT_SMALL) -> None:
    parser.add_argument("--large", default=DEFAULT_LARGE, help="large model: a name, local directory or HF id (default: %(default)s)")
    parser.add_argument("--small", default=small_default, help="small model: a name, local directory or HF id; 'none' = the large model alone (default: %(default)s)")
    parser.add_argument("--early-exit-layer", type=int, metavar="K",
                        help="draft with the large model's own first K layers (same as --small early-exit:K)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --device-map and --small-device; read them back with :func:`placement_from_args`."""
    group = parser.add_argument_group("devices")
    group.add_argument("--device", default="auto",
                       help=f"{DEVICE_CHOICES}; auto = cuda when available, then mps, else cpu (default: %(default)s)")
    group.add_argument("--dtype", default="auto",
                       help=f"auto, {', '.join(DTYPES)}; auto = the checkpoint's own dtype on a GPU, float32 on a "
                            f"CPU (default: %(default)s)")
    group.add_argument("--device-map", metavar="auto",
                       help="'auto': spread the large model over every GPU (accelerate); its inputs go to its first device")
    group.add_argument("--small-device", metavar="DEVICE",
                       help="the small model's device (default: the large model's first device); drafters that share "
                            "the large model's weights always run there")


def placement_from_args(args: argparse.Namespace) -> tuple[Placement, str | None]:
    """(the large model's placement, the small model's device or None) from the device flags; bad ones -> UsageError."""
    try:
        where = placement(args.device, args.dtype, args.device_map)
        if args.small_device is not None:
            resolve_device(args.small_device)
    except PlacementError as error:
        raise UsageError(str(error)) from error
    return where, args.small_device


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a JSON settings file (e.g. from `bild tune`): the pair and decoding settings it holds "
                             "become this command's defaults, flags given on the command line override them; its "
                             "costs, if any, are what generate and serve plan with instead of timing the pair")
    parser.set_defaults(costs=None)  # the file's fixed costs for the adaptive policy, if it has any


def apply_settings_file(subcommand: argparse.ArgumentParser, path: Path) -> dict[str, object]:
    """Make the ``--config`` file's settings the subcommand's defaults (and return them); the caller parses again, so
    flags still win. Settings the subcommand has no flag for (e.g. the thresholds for `bild sweep`, which takes a
    grid) are skipped."""
    from bild.config import SettingsError, read_settings

    try:
        settings = read_settings(path)
    except SettingsError as error:
        raise UsageError(str(error)) from None
    # the flags, and the values the subcommand keeps without a flag (add_config_argument's `costs`)
    flags = {action.dest for action in subcommand._actions} | set(subcommand._defaults)
    subcommand.set_defaults(**{key: value for key, value in settings.items() if key in flags})
    return settings


def costs_for_pair(args: argparse.Namespace, settings: dict[str, object]) -> None:
    """Drop the settings file's costs (with a note) when the command line names another pair than the file: they
    were timed with the file's models."""
    if getattr(args, "costs", None) is None:
        return
    changed = [key for key in ("large", "small") if key in settings and getattr(args, key, None) != settings[key]]
    if changed:
        print(f"note: the settings file's costs were timed with its own {changed[0]} model, not "
              f"{getattr(args, changed[0])!r}: timing this pair instead", file=sys.stderr)
        args.costs = None


LOOKUP_HELP = ("lookup drafting (not in the paper): draft the token that followed the last N tokens where they "
               "occurred before in the prompt or output, checked as at alpha_RB = 0; 0 = off (default: 2 under the "
               "adaptive policy, off under fixed)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BiLDConfig()
    parser.add_argument("--fallback-threshold", type=float, default=defaults.fallback_threshold, help="alpha_FB in [0, 1] (default: %(default)s)")
    parser.add_argument("--rollback-threshold", type=float, default=defaults.rollback_threshold, help="alpha_RB >= 0; 0 = exactly the large model's greedy output, inf = never (default: %(default)s)")
    parser.add_argument("--max-small-steps", type=int, default=defaults.max_small_steps, help="N: most small tokens in a row (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default: %(default)s)")
    parser.add_argument("--repeat-ngram", type=int, default=defaults.repeat_ngram, metavar="N",
                        help="repetition guard (not in the paper): a small token that repeats a token N-gram of the "
                             "output is checked as if alpha_RB were 0; 0 = off (default: %(default)s)")
    parser.add_argument("--policy", choices=["adaptive", "fixed"], default=defaults.policy,
                        help="adaptive: learn per request how long to draft, stop drafting where it does not pay; "
                             "fixed: Algorithm 1 as published (default: %(default)s)")
    parser.add_argument("--lookup", type=int, default=defaults.lookup, metavar="N",
                        help=LOOKUP_HELP)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def config_from_args(args: argparse.Namespace) -> BiLDConfig:
    """Build the validated config; a ValueError becomes a one-line usage error."""
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        return BiLDConfig(
            fallback_threshold=args.fallback_threshold,
            rollback_threshold=args.rollback_threshold,
            max_small_steps=args.max_small_steps,
            max_new_tokens=args.max_new_tokens,
            repeat_ngram=args.repeat_ngram,
            policy=args.policy,
            lookup=args.lookup,
            sampling=sampling,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def load_engine(large: str, small: str | None, where: Placement | None = None, small_device: str | None = None,
                costs: DraftCosts | None = None):
    """Load the pair at ``where`` (the small model on ``small_device`` or the large model's first device; errors ->
    UsageError). Without the default little model, run the large model alone. ``costs``: fixed DraftCosts for the
    adaptive policy (None: the engine measures them)."""
    from bild.decoding import BiLD
    from bild.models import ModelLoadError, ModelPair, check_same_vocabulary, load_model, small_placement

    if small is not None and small.lower() == "none":  # --small none: the large model alone
        small = None
    try:
        where = where or placement()
        large_model = load_model(large, where=where)
        small_model = None
        if small is not None:
            try:
                small_model = load_model(small, large=large_model,
                                         where=small_placement(large_model, where, small_device))
            except ModelLoadError as error:
                if small != DEFAULT_SMALL:
                    raise
                print(f"note: {error}; running the large model alone", file=sys.stderr)
        if small_model is not None:
            check_same_vocabulary(large_model, small_model)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return BiLD(ModelPair(large=large_model, small=small_model), costs=costs)


def comma_numbers(text: str, option: str, kind: type = float) -> tuple:
    """``"0.2,0.4"`` -> (0.2, 0.4); a ValueError names the option when a part is not a number or none is given."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ValueError(f"{option} must be comma-separated {noun}, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


def speedup_bar(enabled: bool, total: int, label: str):
    """A tqdm bar showing the running speedups; returns (callback, bar) or (None, None)."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="ex", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, _total: int, speedups: dict[str, float]) -> None:
        bar.n = done
        best = sorted(speedups.items(), key=lambda item: -item[1])[:4]
        bar.set_postfix_str(" ".join(f"{name} {value:.2f}x" for name, value in best), refresh=False)
        bar.refresh()

    return update, bar


def fail(command: str, message: str) -> int:
    """Print one line for a bad input of ``bild <command>`` and return the usage exit code."""
    print(f"bild {command}: error: {message}", file=sys.stderr)
    return 2


def set_threads(threads: int | None) -> None:
    """``--threads``: torch CPU threads (None keeps torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def check_output(path: Path | None, option: str, directory: bool = False) -> None:
    """Refuse (UsageError) an output that could not be written, before any model loads, so no finished run is lost
    to a bad path: a file path that is a directory, a directory path that is a file, a place where nothing can be
    created (no permission, a read-only or virtual file system such as /proc). Creates the missing directories, as
    the command would, and probes them with a temporary file."""
    if path is None:
        return
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file, not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; give a file name")
    folder = path if directory else path.parent
    existing = next(parent for parent in [folder, *folder.parents] if parent.exists())
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{option} {str(path)!r} cannot be written: {error.strerror or error}") from None


def check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse command-line text that is not valid UTF-8 (Python keeps each undecodable byte as a lone surrogate,
    which no tokenizer takes), naming the argument and the byte. Values naming an existing file are paths, not text."""
    for name, value in vars(args).items():
        if isinstance(value, str) and (found := _UNDECODED_BYTE.search(value)) and not os.path.exists(value):
            label = name if name == "prompt" else "--" + name.replace("_", "-")
            raise UsageError(
                f"{label} is not valid UTF-8 text (byte 0x{ord(found.group()) - 0xDC00:02x} at character "
                f"{found.start()}); save or type it as UTF-8 (a UTF-8 locale, e.g. LANG=C.UTF-8)"
            )


_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")  # os.fsdecode's surrogateescape: byte b becomes U+DC00 + b


def unsupported_dtype(error: RuntimeError) -> str | None:
    """A one-line message when a RuntimeError says an operation lacks the dtype (e.g. float16 on a CPU), else None."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "not implemented for" not in text and "does not support" not in text:
        return None
    return (f"an operation of this model does not support the chosen dtype on this device ({text}); "
            f"use --dtype float32 or bfloat16")
