"""The teacher ensemble: frozen snapshots, their averaged softened probabilities, ensemble accuracy.

Teachers are kesi_dist checkpoints (`kesi_dist.checkpoint`), each rebuilt with its own (pruned)
architecture and MWP masks. They are put in eval mode with gradients off and are never wrapped in
DDP or DeepSpeed: only the student is distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.errors import RunError, UsageError

__all__ = ["load_teachers", "freeze", "ensemble_probs", "evaluate_ensemble"]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and `requires_grad=False` on every parameter (in place); returns the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teachers(paths: Sequence[str], device: str | torch.device = "cpu") -> list[nn.Module]:
    """Load teacher checkpoints (safe `weights_only` loading), frozen, on `device`.

    Raises:
        UsageError: no paths given.
        RunError: a file is missing or not a kesi_dist checkpoint, or teachers disagree on the
            number of classes (the message names the file).
    """
    if not paths:
        raise UsageError("no teacher checkpoints given: the ensemble needs at least one")
    teachers, classes = [], None
    for path in paths:
        ckpt = load_checkpoint(path)
        if classes is not None and ckpt["num_classes"] != classes:
            raise RunError(f"{path}: teacher has {ckpt['num_classes']} classes, {paths[0]} has {classes}; "
                           "all teachers must predict the same classes")
        classes = ckpt["num_classes"]
        model, _ = model_from_checkpoint(ckpt)
        teachers.append(freeze(model.to(device)))
    return teachers


@torch.no_grad()
def ensemble_probs(teachers: Sequence[nn.Module], images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over teachers of softmax(t(images) / T), float32 [B, C], on the images' device."""
    if not teachers:
        raise UsageError("ensemble_probs: no teachers")
    total = None
    for t in teachers:
        device = next(t.parameters()).device
        p = torch.softmax(t(images.to(device)).float() / temperature, dim=1).to(images.device)
        total = p if total is None else total.add_(p)
    return total.div_(len(teachers))


@torch.no_grad()
def evaluate_ensemble(
    teachers: Sequence[nn.Module], loader: Iterable, device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Accuracy of every member and of the ensemble over `loader` (batches of (images, labels[, indices])).

    The ensemble predicts the argmax of the summed (equivalently, averaged) member softmax at T = 1,
    as the paper reports it. `on_batch(batches done)` is called after each batch (progress display).

    Returns:
        {"acc": float, "member_acc": [float per member], "predictions": LongTensor
        [n_members, n_samples] (each member's argmax, in loader order), "labels": LongTensor
        [n_samples], "count": int}.
    """
    if not teachers:
        raise UsageError("evaluate_ensemble: no teachers")
    device = torch.device(device)
    for t in teachers:
        t.eval()
    preds, labels_all, ens_correct = [], [], 0
    for batch in loader:
        images, labels = batch[0].to(device), batch[1].to(device)
        probs = [torch.softmax(t(images).float(), dim=1) for t in teachers]
        ens_correct += int((torch.stack(probs).sum(0).argmax(1) == labels).sum())
        preds.append(torch.stack([p.argmax(1) for p in probs]).cpu())
        labels_all.append(labels.cpu())
        if on_batch is not None:
            on_batch(len(preds))
    if not preds:
        raise RunError("evaluate_ensemble: the loader yielded no batches (empty validation split?)")
    predictions = torch.cat(preds, dim=1)
    labels = torch.cat(labels_all)
    n = labels.numel()
    return {
        "acc": ens_correct / n,
        "member_acc": (predictions == labels).float().mean(1).tolist(),
        "predictions": predictions,
        "labels": labels,
        "count": n,
    }
