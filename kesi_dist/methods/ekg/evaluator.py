"""What evaluates an EKG sub-network: a zoo model and the holdout tensors, plain PyTorch.

A sub-network is (widths, order): unit i keeps the `widths[i]` channels ranked best by `order[i]`;
the others are masked at the unit's consumers (the weights never change). `SubnetEvaluator.evaluate`
gives its holdout score and logits, `SubnetEvaluator.taylor` its channels' first-order Taylor
importance per holdout batch (the reference code's, sseung0703/EKG). An actor of the search's pool holds
one (`kesi_dist.methods.ekg.search_stage.SearchWorker`); the greedy loop (`search.SubnetSearch`) does not.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.train.bn import batch_statistics

__all__ = ["SubnetEvaluator", "Order", "Result"]

Order = list[torch.Tensor]  # per unit: each channel's rank, 0 = most important
Result = tuple[float, float, torch.Tensor]  # (score, CE, logits) of a sub-network on the holdout


class SubnetEvaluator:
    """A zoo model and the holdout tensors (`images` normalised NCHW, `labels`), on `device`: evaluates
    and scores sub-networks given as (widths, order). BatchNorm uses each batch's statistics (the batch
    is `batch_size` images of the holdout, in order), the weights and running statistics never change."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.units, self.batch_size = model.units(), batch_size
        self.num_batches = math.ceil(len(labels) / batch_size)

    @contextmanager
    def masked(self, widths: list[int], order: Order, scores: list[torch.Tensor] | None = None) -> Iterator[None]:
        """Consumers of each unit see only its `widths[i]` best channels; with `scores`, every call adds
        |sum(y * dS/dy)| per channel of the masked input y (the Taylor importance)."""
        modules = dict(self.model.named_modules())
        handles = []
        for i, unit in enumerate(self.units):
            mask = (order[i] < widths[i]).float()

            def pre(module, args, mask=mask, i=i):
                x = args[0]
                y = x * mask.to(x).view(1, -1, *([1] * (x.dim() - 2)))
                if scores is not None and y.requires_grad:
                    dims = [d for d in range(y.dim()) if d != 1]

                    def accumulate(g, y=y, dims=dims, i=i):  # returns None: the gradient passes unchanged
                        scores[i].add_((g * y).sum(dims).abs().detach().double().cpu())

                    y.register_hook(accumulate)
                return (y, *args[1:])

            for name in unit.consumers:
                handles.append(modules[name].register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def objective(logits: torch.Tensor, labels: torch.Tensor, knowledge: torch.Tensor | None) -> tuple:
        """(CE + soft CE to softmax(K), CE), both summed over the batch (K absent: the soft term is 0)."""
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        if knowledge is None:
            return ce, ce
        soft = -(F.softmax(knowledge.to(logits.device).float(), 1) * F.log_softmax(logits.float(), 1)).sum()
        return ce + soft, ce

    def _batch(self, b: int) -> slice:
        return slice(b * self.batch_size, (b + 1) * self.batch_size)

    def evaluate(self, widths: list[int], order: Order, knowledge: torch.Tensor | None) -> Result:
        """(score, CE, logits) of the sub-network on the holdout: per-sample means; logits on the CPU."""
        total = ce_total = 0.0
        outs = []
        with torch.no_grad(), batch_statistics(self.model), self.masked(widths, order):
            for b in range(self.num_batches):
                sl = self._batch(b)
                logits = self.model(self.images[sl])
                s, ce = self.objective(logits, self.labels[sl], None if knowledge is None else knowledge[sl])
                total, ce_total = total + float(s), ce_total + float(ce)
                outs.append(logits.float().cpu())
        n = len(self.labels)
        return total / n, ce_total / n, torch.cat(outs)

    def taylor(self, widths: list[int], order: Order, knowledge: torch.Tensor, start: int = 0,
               stop: int | None = None) -> list[list[torch.Tensor]]:
        """Per holdout batch `start` .. `stop` - 1: the Taylor importance of every channel of every unit
        (float64, CPU) for the sub-network and K (A.5); the search sums them in batch order."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)  # gradients reach the activations only: the weights never change
        out = []
        try:
            for b in range(start, self.num_batches if stop is None else stop):
                scores = [torch.zeros(len(o), dtype=torch.float64) for o in order]
                sl = self._batch(b)
                with batch_statistics(self.model), self.masked(widths, order, scores):
                    x = self.images[sl].clone().requires_grad_(True)
                    s, _ = self.objective(self.model(x), self.labels[sl], knowledge[sl])
                    (s / self.batch_size).backward()
                out.append(scores)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return out
