"""Supernet training, plain PyTorch: SWP's stage-wise supernets and a whole-network supernet.

`StageSupernet` is what a worker trains for a supernet task: the zoo net being trained (the L1-ordered
baseline, `kesi_dist.models.slimmable`) and a frozen copy of the baseline around it. For stage s, the
frozen baseline's stages 0..s-1 give the stage's input and its stage s the target (DNA's block-wise
supervision); only stage s's weights train, so the stages are independent and train in parallel. With
`stage=None` the whole net trains (the conventional one-shot supernet SWP argues against).

`SupernetTraining` is the Task (`kesi_dist.train.tasks.Task`; `task_specs.SupernetSpec` describes one): every step runs several width configurations
in one forward pass of the prepared module and returns the sum of their losses, so one backward
accumulates every configuration's gradient before the one optimizer step:
    sandwich  the full configuration (stage target: MSE to the baseline's stage output; last stage or
              whole net: CE on the labels), the tiny one and `n_random` random ones, each supervised by
              the full one's detached output (in-place distillation: MSE, or soft CE on the logits)
    uniform   one configuration drawn uniformly per unit, CE on the labels (no full, no tiny, no KD)
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.models.slimmable import run_sliced, width_choices
from kesi_dist.train.tasks import TaskOutput

__all__ = ["StageSupernet", "SupernetTraining", "MODES"]

MODES = ("sandwich", "uniform")


class StageSupernet(nn.Module):
    """The trained net's stage `stage` (all of it for None) between the frozen baseline's stages."""

    def __init__(self, net: nn.Module, teacher: nn.Module, stage: int | None):
        super().__init__()
        self.net, self.stage = net, stage
        self.teacher = teacher.eval().requires_grad_(False)
        for name, p in net.named_parameters():
            p.requires_grad_(stage is None or net.stage_of(name) == stage)
        self.last = stage is None or stage == net.num_stages - 1

    def train(self, mode: bool = True) -> "StageSupernet":
        super().train(mode)
        self.teacher.eval()  # the frozen baseline always normalises with its own running statistics
        return self

    def forward(self, x: torch.Tensor, configs: Sequence[Sequence[int]] | None = None):
        """Without `configs`: logits of the full configuration (the baseline around the trained stage).
        With them: (target or None, [output of each configuration], logits of the first one)."""
        s = self.stage
        with torch.no_grad():
            u = x
            if s is not None:
                for i in range(s):
                    u = self.teacher.forward_stage(u, i)
            target = None if self.last else self.teacher.forward_stage(u, s)
        if configs is None:
            out = self.net(u) if s is None else self.net.forward_stage(u, s)
            return out if self.last else self._rest(out)
        outs = [run_sliced(self.net, u, c, s) for c in configs]
        logits = outs[0] if self.last else self._rest(outs[0].detach())
        return target, outs, logits

    @torch.no_grad()
    def _rest(self, y: torch.Tensor) -> torch.Tensor:
        for i in range(self.stage + 1, self.net.num_stages):
            y = self.teacher.forward_stage(y, i)
        return y


class SupernetTraining:
    """The supernet Task (see the module docstring): `mode` "sandwich" or "uniform"."""

    needs_indices = False
    augments = False

    def __init__(self, *, teacher: nn.Module, stage: int | None, ratios: Sequence[float], mode: str = "sandwich",
                 n_random: int = 2, seed: int = 0, round_to: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        self.teacher, self.stage, self.ratios, self.mode = teacher, stage, list(ratios), mode
        self.n_random, self.seed, self.round_to = n_random, seed, round_to
        self.epoch = self.step = 0

    def prepare(self, model: nn.Module) -> StageSupernet:
        """The module the worker trains and wraps (DDP, DeepSpeed): `model` (whose weights are saved)
        inside the frozen baseline."""
        if self.stage is not None and not model.num_stages:
            raise ValueError(f"{model.arch} has no fixed-width stages to train apart")
        self.full = list(model.widths)
        self.choices = width_choices(self.full, self.ratios, self.round_to)
        self.mine = [i for i, u in enumerate(model.units()) if self.stage is None or u.stage == self.stage]
        teacher = copy.deepcopy(self.teacher).to(next(model.parameters()).device)
        return StageSupernet(model, teacher, self.stage)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = int(epoch), 0

    def _random(self, rng: random.Random) -> list[int]:
        w = list(self.full)
        for i in self.mine:
            w[i] = rng.choice(self.choices[i])
        return w

    def configs(self) -> list[list[int]]:
        """This step's configurations: the same on every rank (seeded by seed, epoch and step)."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.step}")
        self.step += 1
        if self.mode == "uniform":
            return [self._random(rng)]
        tiny = list(self.full)
        for i in self.mine:
            tiny[i] = self.choices[i][0]
        return [list(self.full), tiny] + [self._random(rng) for _ in range(self.n_random)]

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        target, outs, logits = model(images, self.configs())
        last = target is None
        full = F.cross_entropy(outs[0], labels) if last else F.mse_loss(outs[0], target)
        if self.mode == "uniform":
            return TaskOutput(full, logits, {})
        ref = outs[0].detach()
        if last:
            soft = F.softmax(ref.float(), 1)
            subs = [-(soft * F.log_softmax(o.float(), 1)).sum(1).mean() for o in outs[1:]]
        else:
            subs = [F.mse_loss(o, ref) for o in outs[1:]]
        sub = torch.stack(subs).sum()
        return TaskOutput(full + sub, logits, {"full_loss": full.detach(), "sub_loss": sub.detach() / len(subs)})
