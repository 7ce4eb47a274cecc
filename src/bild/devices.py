"""Devices and dtypes: where a model loads (:class:`Placement`), checked against this machine, and where its inputs go.

Rules: device "auto" is cuda when available, then mps, else cpu; dtype "auto" is float32 on a CPU and the
checkpoint's own dtype on a GPU; ``device_map="auto"`` lets accelerate spread a large model over every GPU, and its
inputs then go to the device of its input embedding. A wrong choice raises :class:`PlacementError` (a ValueError)
whose message names what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """A device, dtype or device map this machine or model cannot give; the message says what is allowed."""


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where a model loads and in which dtype; made by :func:`placement`, which checks it against this machine.

    ``device`` is never "auto" here. With ``device_map`` ("auto": accelerate spreads the model over every GPU, or a
    dict of module -> device) the model's parts may sit on several devices; its inputs go to the device of its input
    embedding (:func:`input_device`). ``dtype`` "auto" is float32 on a CPU and the checkpoint's own dtype elsewhere.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | str = "auto"  # a torch dtype, or "auto"
    device_map: str | dict | None = None

    @property
    def load_dtype(self) -> torch.dtype | str:
        """What ``from_pretrained(dtype=...)`` gets: "auto" reads the checkpoint's dtype (on GPUs only)."""
        if self.dtype != "auto":
            return self.dtype
        return torch.float32 if self.device.type == "cpu" else "auto"  # (a device map with no GPU here: the CPU)


def placement(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
              device_map: str | dict | None = None) -> Placement:
    """Check a device ("auto", "cpu", "cuda", "cuda:N", "mps"; auto = cuda when available, then mps, else cpu), a
    dtype ("auto", "float32", "bfloat16", "float16" or a torch dtype) and a device map ("auto" or a dict) against
    this machine; raise :class:`PlacementError` with what is allowed."""
    return Placement(device=resolve_device(device, device_map), dtype=resolve_dtype(dtype), device_map=device_map)


def resolve_device(device: str | torch.device, device_map: str | dict | None = None) -> torch.device:
    text = str(device).strip().lower()
    if device_map is not None:
        if device_map != "auto" and not isinstance(device_map, dict):
            raise PlacementError(f"--device-map must be 'auto' (accelerate spreads the model over the GPUs), got {device_map!r}")
        if text not in ("auto", "cuda"):
            raise PlacementError(f"--device-map chooses the devices itself: leave --device at auto (got {device!r})")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise PlacementError("--device mps: the MPS backend (Apple GPUs) is not available on this machine")
        return torch.device("mps")
    kind, _, index = text.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PlacementError(f"--device {text}: CUDA is not available ({why}); use --device cpu or auto")
        number = int(index) if index else torch.cuda.current_device()
        if number >= torch.cuda.device_count():
            raise PlacementError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", number)
    raise PlacementError(f"--device must be {DEVICE_CHOICES}, got {device!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PlacementError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    text = str(dtype).strip().lower().removeprefix("torch.")
    if text == "auto":
        return "auto"
    if text not in DTYPES:
        raise PlacementError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[text]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids go to: its input embedding's (the first device of a device-mapped model)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):  # not a transformers model (e.g. a test double)
        pass
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's floating-point weights (its input embedding's)."""
    try:
        return model.get_input_embeddings().weight.dtype
    except (AttributeError, NotImplementedError):
        pass
    floating = (t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    return next(floating, torch.float32)


def model_devices(model: torch.nn.Module) -> set[torch.device]:
    """Every device holding one of the model's parameters or buffers."""
    return {tensor.device for tensor in (*model.parameters(), *model.buffers())}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an asynchronous device (CUDA, MPS), so a timer around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
