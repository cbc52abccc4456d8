"""Trained weights from the user's own file (`model.weights`): a state dict, checked against the network.

    report = load_source_weights(model, "resnet50_finetuned.pth")   # or .safetensors, or s3://...
    if report.head_replaced: ...                                    # the baseline must be fine-tuned

`.safetensors` files are read with safetensors; anything else with kesi_dist's weights-only loader
(`kesi_dist.checkpoint.load_tensors`), so a pickle that would run code is refused and never runs. The
file holds a bare state dict, or a dict with one under "state_dict" or "model" (DDP's "module." prefix
is dropped). For a torchvision/timm network the keys are the library's own (`GraphNet.net`'s). A file
whose keys or shapes differ is refused naming the first mismatching key, except the classifier head's
shapes: a head for another number of classes is left as built (freshly initialised) and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kesi_dist import storage
from kesi_dist.checkpoint import load_tensors
from kesi_dist.errors import RunError, UsageError
from kesi_dist.models import build_model
from kesi_dist.models.graphnet import GraphNet
from kesi_dist.models.sources import head_paths

__all__ = ["LoadReport", "read_state_dict", "load_source_weights"]

_OPTIONAL = ("num_batches_tracked",)  # BatchNorm counters: absent from some exports, never used in eval


@dataclass(frozen=True)
class LoadReport:
    """What `load_source_weights` did: `head_replaced` when the file's head was for other classes
    (`file_classes` of them) and the model keeps its own fresh head; `message` says it in one line."""

    path: str
    tensors: int
    head_replaced: bool
    file_classes: int | None
    message: str


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not a state dict"
        raise UsageError(f"model.weights {path}: holds {what}; save the weights with "
                         "torch.save(model.state_dict(), path) or safetensors.torch.save_file")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in `path` (local or a storage URI), read safely.

    Raises:
        UsageError: a missing or unreadable file, a pickle holding code, or no state dict inside.
    """
    path = path if storage.is_uri(path) else str(path)
    try:
        found = storage.is_file(path)
    except OSError as e:
        raise UsageError(f"model.weights {path}: cannot read it ({e})") from None
    if not found:
        raise UsageError(f"model.weights {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return _unwrap(load(storage.read_bytes(path)), path)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on garbage
            raise UsageError(f"model.weights {path}: not a readable safetensors file ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:160]})") from None
    try:
        obj = load_tensors(path)
    except RunError as e:
        why = str(e).split(": ", 1)[-1].split("; only load")[0]
        raise UsageError(f"model.weights {path}: {why}; save a plain state dict (torch.save(model.state_dict(), "
                         "path)) or a .safetensors file") from None
    return _unwrap(obj, path)


def _under(key: str, heads: tuple[str, ...]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def load_source_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load the trained state dict in `path` into the unpruned `model` (a zoo model or a `GraphNet`).

    Raises:
        UsageError: unreadable file (see `read_state_dict`), or a key or shape that does not fit the
            model outside its classifier head: one line naming the first mismatching key.
    """
    target = model.net if isinstance(model, GraphNet) else model
    expected = target.state_dict()
    arch = model.arch
    if isinstance(model, GraphNet):
        heads = head_paths(arch)
    else:  # the zoo's head: whatever changes shape with the number of classes
        with torch.device("meta"):
            other = build_model(arch, model.num_classes + 1, list(model.widths), **model.options).state_dict()
        heads = tuple({k.rpartition(".")[0] for k, v in expected.items() if other[k].shape != v.shape})
    got = read_state_dict(path)
    for key, ref in expected.items():
        if key not in got:
            if key.endswith(_OPTIONAL):
                continue
            raise UsageError(f"model.weights {path}: does not fit {arch}: the file has no {key!r} (first "
                             f"mismatching key; is it a {arch} state dict?)")
        if got[key].shape != ref.shape and not _under(key, heads):
            raise UsageError(f"model.weights {path}: does not fit {arch}: {key} is {tuple(got[key].shape)} in the "
                             f"file, {tuple(ref.shape)} in the network (first mismatching key)")
    extra = [k for k in got if k not in expected]
    if extra:
        raise UsageError(f"model.weights {path}: does not fit {arch}: the network has no {extra[0]!r} (first "
                         "mismatching key)")
    replaced = [k for k, ref in expected.items() if k in got and got[k].shape != ref.shape]
    load = {k: v for k, v in got.items() if k not in replaced}
    missing, _ = target.load_state_dict(load, strict=False)
    assert set(missing) <= set(replaced) | {k for k in expected if k.endswith(_OPTIONAL)}, missing
    n = sum(v.numel() for v in load.values())
    if not replaced:
        return LoadReport(str(path), len(load), False, None, f"loaded {len(load)} tensors ({n:,} values) from {path}")
    weight = next((k for k in replaced if k.endswith(".weight")), replaced[0])
    classes = int(got[weight].shape[0])
    return LoadReport(str(path), len(load), True, classes,
                      f"loaded {len(load)} tensors from {path}; its head ({', '.join(replaced)}) is for {classes} "
                      f"classes, the model has {model.num_classes}: a new head is trained")
