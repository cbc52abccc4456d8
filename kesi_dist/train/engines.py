"""Wrapping a model for data-parallel training (DDP or DeepSpeed ZeRO) and saving/restoring its state.

No Ray here: these functions only need an initialised `torch.distributed` process group (or none, for a
single process). Only the trained model is ever wrapped; teachers stay bare.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kesi_dist.checkpoint import load_tensors
from kesi_dist.errors import BadValue, RunError

__all__ = ["Wrapped", "wrap_model", "save_engine_state", "load_engine_state", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Wrapped:
    """The pieces a training loop needs: `model` (maybe wrapped), torch `optimizer`, `engine` (DeepSpeed
    engine or None), `bare` (the unwrapped model) and the mask hooks that must stay alive."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, engine: Any, bare: nn.Module, hooks=()):
        self.model, self.optimizer, self.engine, self.bare, self.hooks = model, optimizer, engine, bare, list(hooks)


def wrap_model(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    engine: str,
    device: torch.device,
    zero_stage: int = 0,
    bf16: bool = False,
    micro_batch_size: int = 1,
    masks: dict[str, torch.Tensor] | None = None,
) -> Wrapped:
    """Put `model` (already on `device`) under DDP or DeepSpeed; a single process keeps it bare.

    DeepSpeed gets the torch optimizer (ZeRO partitions its state) and the config
    {zero_optimization.stage, bf16.enabled (CUDA only), train_micro_batch_size_per_gpu}; the LR
    scheduler stays the torch one, stepped by the loop. Under ZeRO the gradients are partitioned
    during backward, so MWP gradient masks are applied by tensor hooks (they run before the reduce).
    """
    if engine == "ddp":
        if is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return Wrapped(model, optimizer, None, getattr(model, "module", model))
    if engine != "deepspeed":
        raise BadValue("engine", f"unknown engine {engine!r}; choose ddp or deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    hooks = []
    if masks:
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            m = mask.to(device=device, dtype=params[name].dtype)
            hooks.append(params[name].register_hook(lambda g, m=m: g * m))
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16 and device.type == "cuda")},
        "zero_allow_untested_optimizer": True,  # plain torch SGD/Adam: the paper's optimizers
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                              dist_init_required=False if dist.is_initialized() else None)
    return Wrapped(ds_engine, optimizer, ds_engine, ds_engine.module, hooks)


def _ds_fp32_partitions(opt: Any) -> list[torch.Tensor] | None:
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def save_engine_state(w: Wrapped, directory: str | Path, rank: int) -> None:
    """Write the optimizer state this rank owns: `optimizer.pt` (rank 0, DDP/single process) or
    `optimizer_rank{r}.pt` (DeepSpeed: every rank holds its own ZeRO partition). Plain tensors and
    numbers only, so they load with `weights_only=True`."""
    directory = Path(directory)
    if w.engine is None:
        if rank == 0:
            torch.save(w.optimizer.state_dict(), directory / "optimizer.pt")
        return
    opt = w.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    state = {"base": base.state_dict(), "fp32": [t.detach().cpu() for t in (_ds_fp32_partitions(opt) or [])]}
    torch.save(state, directory / f"optimizer_rank{rank}.pt")


def load_engine_state(w: Wrapped, directory: str | Path, rank: int) -> None:
    """Restore what `save_engine_state` wrote, after the model weights have been loaded."""
    directory = Path(directory)
    name = "optimizer.pt" if w.engine is None else f"optimizer_rank{rank}.pt"
    path = directory / name
    if not path.is_file():
        raise RunError(f"{path}: missing from the checkpoint (was it written with another engine or "
                       "number of workers?); start without --resume")

    state = load_tensors(path)  # weights_only: an optimizer file that would run code is refused
    if w.engine is None:
        w.optimizer.load_state_dict(state)
        return
    opt = w.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    base.load_state_dict(state["base"])
    parts = _ds_fp32_partitions(opt) or []
    if len(parts) != len(state["fp32"]):
        raise RunError(f"{path}: ZeRO partitions do not match this run (different zero_stage or workers)")
    with torch.no_grad():
        for dst, src in zip(parts, state["fp32"]):
            if dst.shape != src.shape:
                raise RunError(f"{path}: ZeRO partition shape {tuple(src.shape)} != {tuple(dst.shape)}; "
                               "resume with the same number of workers")
            dst.copy_(src)
