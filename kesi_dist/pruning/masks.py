"""Mask mechanics: keep unstructured-pruned weights at exactly zero, whoever chose them.

Masks are `{parameter name: 0/1 tensor of its shape}`, keyed by `model.named_parameters()` of the
unwrapped model. Through training, masking the gradient alone is not enough: weight decay, momentum
and Adam state revive a zeroed weight at `optimizer.step()`. `MaskConstraint` therefore masks the
gradients before the step and re-applies the masks after it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv_weights", "apply_masks", "mask_gradients", "sparsity", "MaskConstraint"]


def conv_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Conv2d, keyed by its name in `model.named_parameters()`."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def _check(params: dict[str, nn.Parameter], masks: dict) -> None:
    missing = [n for n in masks if n not in params]
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {missing[:3]}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> None:
    """Zero the masked weights in place (`w *= mask`)."""
    params = dict(model.named_parameters())
    _check(params, masks)
    for name, mask in masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict) -> None:
    """Zero the gradients of masked weights in place (`grad *= mask`); call before `optimizer.step()`."""
    params = dict(model.named_parameters())
    _check(params, masks)
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(mask.to(device=g.device, dtype=g.dtype))


def sparsity(masks: dict) -> float:
    """Fraction of masked-out entries over all masked tensors."""
    total = sum(m.numel() for m in masks.values())
    return float(sum((m == 0).sum().item() for m in masks.values()) / total) if total else 0.0


class MaskConstraint:
    """Hold `masks` fixed around every optimizer step: `before_step` (after backward), `after_step`."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = dict(masks)

    def to(self, device: torch.device | str) -> MaskConstraint:
        """A copy with the masks on `device`, so each step does not copy them there again."""
        return MaskConstraint({k: m.to(device) for k, m in self.masks.items()})

    def before_step(self, model: nn.Module) -> None:
        mask_gradients(model, self.masks)

    def after_step(self, model: nn.Module) -> None:
        apply_masks(model, self.masks)
