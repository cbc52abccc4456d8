"""One epoch of training and evaluation, in plain PyTorch (no Ray).

The loop drives a `Task` (`kesi_dist.train.tasks`): the task owns the forward pass, however many
sub-networks it runs, and returns the loss; the loop owns backward, the optimizer step, constraints,
divergence checks and metrics. Constraints (e.g. MWP masks, `kesi_dist.pruning.masks.MaskConstraint`)
act around every optimizer step: `before_step` on the gradients, `after_step` on the weights.

The same functions run in a single process, in a Ray Train worker under DDP, or under DeepSpeed:
with `torch.distributed` initialised, the metric totals are summed over ranks so every rank returns the
global numbers.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kesi_dist.errors import RunError
from kesi_dist.train.tasks import Classification, Task

__all__ = ["DivergedError", "StepEngine", "Constraint", "train_epoch", "evaluate", "unwrap"]


class DivergedError(RunError):
    """The training loss became NaN or infinite; raised before the step is applied or any snapshot saved."""


class StepEngine(Protocol):
    """What a DeepSpeed engine offers (duck-typed so this module never imports deepspeed)."""

    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> Any: ...


class Constraint(Protocol):
    """Something every optimizer step must respect, applied to the unwrapped model."""

    def before_step(self, model: nn.Module) -> None: ...  # after backward: e.g. mask the gradients
    def after_step(self, model: nn.Module) -> None: ...  # after the step: e.g. re-zero masked weights


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper or DeepSpeed engine (mask names refer to it)."""
    return getattr(model, "module", model)


def _autocast(device: torch.device, bf16: bool):
    # bf16 only pays off (and is only tested) on CUDA; on CPU it would silently slow training down.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def _global_sums(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    # gloo reduces CPU tensors, nccl CUDA tensors: follow the backend, not the model's device.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    task: Task | None = None,
    constraints: Sequence[Constraint] = (),
    device: str | torch.device = "cpu",
    autocast_bf16: bool = False,
    channels_last: bool = False,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    engine: StepEngine | None = None,
    trace: list | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train `model` for one pass over `loader` (or `max_steps` batches).

    Args:
        model: the model, possibly wrapped in DDP or a DeepSpeed engine (then pass it as `engine` too).
        loader: yields (images, labels) or (images, labels, sample indices); tensors are moved to
            `device` if they are not there yet.
        optimizer: a torch optimizer; with `engine` set, the engine steps it.
        scheduler: stepped after every optimizer step; None keeps the LR fixed.
        task: computes the loss of a batch (default: `Classification`, cross-entropy); its `parts`
            are averaged into the metrics as `train/<key>`. Call `task.set_epoch` with the loader's.
        constraints: applied around every optimizer step (MWP masks), on the unwrapped model.
        autocast_bf16, channels_last: only take effect on CUDA.
        grad_clip: max global gradient norm (DDP path; DeepSpeed clips via its config).
        engine: a DeepSpeed engine: `engine.backward(loss)` / `engine.step()` replace backward/step.
        trace: if given, gets (lr, momentum) of every optimizer step appended.
        on_step: called with the number of steps done after each one (progress display).

    Returns:
        {"train/loss", "train/acc", "images_per_s", "epoch_s", "steps", "images"} summed over ranks,
        plus `train/<key>` for every entry of the task's `parts`.

    Raises:
        DivergedError: the loss is NaN/inf (checked every step, before the update).
    """
    device = torch.device(device)
    use_cl = channels_last and device.type == "cuda"
    task = task if task is not None else Classification()
    bare = unwrap(model)
    model.train()
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    extra: dict[str, float] = {}
    steps = 0
    start = time.perf_counter()
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        images, labels, indices = batch[0], batch[1], (batch[2] if len(batch) > 2 else None)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if use_cl:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast_bf16):
            out = task(model, images, labels, indices)
        loss, logits, parts = out.loss, out.logits, out.parts
        if not torch.isfinite(loss.detach()).all():
            raise DivergedError(
                f"training diverged: loss is {loss.item()} at step {steps + 1} of the epoch "
                f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate"
            )
        if engine is not None:
            engine.backward(loss)
            for c in constraints:  # under ZeRO the grads are partitioned: wrap_model's hooks mask them
                c.before_step(bare)
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for c in constraints:
                c.before_step(bare)
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        for c in constraints:
            c.after_step(bare)
        if trace is not None:  # the LR and momentum this step used (one-cycle moves them every step)
            group = optimizer.param_groups[0]
            trace.append((float(group["lr"]), float(group.get("momentum", group.get("betas", (0.0,))[0]))))
        if scheduler is not None:
            scheduler.step()
        n = labels.shape[0]
        totals["loss"] += loss.detach().float().item() * n
        totals["correct"] += (logits.detach().argmax(1) == labels).sum().item()
        totals["count"] += n
        for k, v in parts.items():
            extra[k] = extra.get(k, 0.0) + float(v.detach().float().item() if torch.is_tensor(v) else v) * n
        steps += 1
        if on_step is not None:
            on_step(steps)
    elapsed = time.perf_counter() - start
    keys = sorted(extra)
    sums = _global_sums([totals["loss"], totals["correct"], totals["count"], *(extra[k] for k in keys)], device)
    count = max(sums[2], 1.0)
    metrics = {
        "train/loss": sums[0] / count,
        "train/acc": sums[1] / count,
        "images_per_s": sums[2] / elapsed if elapsed > 0 else math.nan,
        "epoch_s": elapsed,
        "steps": steps,
        "images": int(sums[2]),
    }
    metrics.update({f"train/{k}": v / count for k, v in zip(keys, sums[3:])})
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    *,
    autocast_bf16: bool = False,
    channels_last: bool = False,
    prefix: str = "val",
) -> dict[str, float]:
    """Cross-entropy loss and top-1 accuracy over `loader` (summed over ranks when distributed), as
    `{prefix}/loss` and `{prefix}/acc` ("val": the test split; "holdout": the selection split)."""
    device = torch.device(device)
    use_cl = channels_last and device.type == "cuda"
    # The bare model: a DDP forward would sync buffers and hang if shards have unequal batch counts.
    model = unwrap(model)
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in loader:
        images, labels = batch[0], batch[1]  # a loader built with return_indices also yields indices
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if use_cl:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast_bf16):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += labels.shape[0]
    loss_sum, correct, count = _global_sums([loss_sum, correct, count], device)
    if count == 0:
        raise RunError(f"evaluation loader is empty: the {prefix} split has no images for this worker")
    return {f"{prefix}/loss": loss_sum / count, f"{prefix}/acc": correct / count}
