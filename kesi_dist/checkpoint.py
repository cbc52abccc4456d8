"""Model checkpoints that rebuild anywhere from what they store.

A checkpoint is a plain `torch.save` of
    {"format": "kesi_dist/v1", "arch", "widths", "num_classes", "options", "state_dict", "masks", "metrics",
     **extra}
Loading uses `torch.load(weights_only=True)`, so a file can only contain tensors and plain
containers: a pickle that would run code is refused, never executed. The pruning history is not
needed: `(arch, widths, num_classes, options)` rebuilds the exact architecture. `options` are the
architecture's own choices (a CIFAR ResNet's shortcut); a checkpoint written before they existed has
none and is rebuilt as it was built then (`LEGACY_OPTIONS`).

Paths may be local or storage URIs (`kesi_dist.storage`): a URI is read into memory and loaded from
bytes with the same `weights_only=True` checks, and written atomically through the storage helpers.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kesi_dist import storage
from kesi_dist.errors import KesiError, RunError
from kesi_dist.models import build_model, model_options
from kesi_dist.pruning.masks import apply_masks

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "load_tensors", "model_from_checkpoint",
           "checkpoint_options", "load_model"]

FORMAT = "kesi_dist/v1"
_CORE = ("format", "arch", "widths", "num_classes", "state_dict", "masks", "metrics")
# What checkpoints without "options" were built with: CIFAR ResNets sliced their shortcut.
LEGACY_OPTIONS = {"shortcut": "slice"}


def save_checkpoint(
    path: str | Path, model: nn.Module, masks: dict | None = None, metrics: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write `model` (a zoo model) and its masks/metrics to `path` atomically.

    `extra` entries are stored at the top level; they must be tensors or plain Python values
    (str, int, float, bool, None, list, dict) so that the file loads with `weights_only=True`.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_CORE))
    clash += ["options"] if "options" in extra else []
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the checkpoint's own fields")
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "arch": model.arch,
        "widths": list(model.widths),
        "num_classes": int(model.num_classes),
        "options": dict(getattr(model, "options", {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "masks": None if masks is None else {k: v.detach().cpu() for k, v in masks.items()},
        "metrics": dict(metrics or {}),
        **extra,
    }
    storage.write_file(path, lambda f: torch.save(ckpt, f))


def load_tensors(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU: the one place kesi_dist reads a torch file.

    Model checkpoints, training state and optimizer state all come through here, so a file that would
    import or call anything beyond tensors and plain containers is refused, never executed.

    Raises:
        RunError: one line naming the file: refused (it holds code), or truncated/corrupt.
    """
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e))
        reason = f"unsupported {found.group(1)}" if found else "unsupported content"
        raise RunError(
            f"{path}: refused to load: it holds more than tensors and plain containers ({reason}); "
            "only load checkpoints written by kesi_dist"
        ) from None
    except Exception as e:  # noqa: BLE001 - the unpickler raises anything on garbage (IndexError, EOFError, ...)
        detail = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:160]
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt: {detail})") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint written by `save_checkpoint` (safe: `weights_only=True`).

    Raises:
        RunError: the file is missing, truncated or corrupt, holds a pickle that would import or
            call anything beyond tensors and plain containers, is not a kesi_dist/v1 checkpoint,
            or its state_dict does not fit `(arch, widths, num_classes)`.
    """
    path = path if storage.is_uri(path) else Path(path)
    try:
        found = storage.is_file(path)
    except OSError as e:  # unreachable storage, missing credentials
        raise RunError(f"{path}: cannot read checkpoint ({e})") from None
    if not found:
        raise RunError(f"{path}: no such checkpoint file")
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunError(f"{path}: not a kesi_dist checkpoint (expected format {FORMAT!r}, got {got!r})")
    missing = [k for k in _CORE if k not in ckpt]
    if missing:
        raise RunError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        with torch.device("meta"):
            skeleton = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["widths"], **checkpoint_options(ckpt))
    except KesiError as e:
        raise RunError(f"{path}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict):
        raise RunError(f"{path}: state_dict is a {type(sd).__name__}, expected a dict of tensors")
    got = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise RunError(f"{path}: state_dict does not match {ckpt['arch']} with the stored widths (first: {diff[0]})")
    masks = ckpt["masks"]
    if masks is not None:
        bad = [k for k, m in masks.items() if k not in expected or tuple(m.shape) != expected[k]]
        if bad:
            raise RunError(f"{path}: mask {bad[0]!r} does not match a parameter of the model")
    return ckpt


def checkpoint_options(ckpt: dict) -> dict:
    """The architecture options a loaded checkpoint was built with (`LEGACY_OPTIONS` when it predates them)."""
    options = ckpt.get("options")
    if options is None:
        options = {k: v for k, v in LEGACY_OPTIONS.items() if k in model_options(ckpt["arch"])}
    return dict(options)


def model_from_checkpoint(ckpt: dict) -> tuple[nn.Module, dict | None]:
    """Rebuild the model of a loaded checkpoint, load its weights and re-apply its masks.

    Returns:
        (model in eval mode, masks or None).
    """
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["widths"], **checkpoint_options(ckpt))
    model.load_state_dict(ckpt["state_dict"])
    masks = ckpt.get("masks")
    if masks:
        apply_masks(model, masks)
    return model.eval(), masks


def load_model(path: str | Path) -> nn.Module:
    """The model (eval mode, masks applied) of the checkpoint file or URI at `path`."""
    return model_from_checkpoint(load_checkpoint(path))[0]
