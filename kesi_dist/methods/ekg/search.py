"""EKG's greedy, training-free sub-network search, plain PyTorch (shared/design/EKG_SWP.md A.3-A.7;
reference sseung0703/EKG).

A sub-network of a zoo model is one kept-channel count per prunable unit (the block inner widths, as
PFEC); each unit keeps its channels ranked highest by a first-order Taylor importance. Every step:

    scores      |sum_{n,h,w} y * dS/dy| per channel (per batch and call site, then summed) with
                S = CE(labels) + soft CE to softmax(K), BN on batch statistics, running stats frozen
    unit_cost   what narrowing a unit by its step removes: the sum of its next channels' scores
    candidates  the units at or below the trimmed Otsu threshold of the costs
    evaluate    each candidate's holdout score S with that unit narrowed (a step that would cross the
                MACs target is refined channel by channel to the widest width at or under it)
    accept      the lowest score; K becomes the running mean of the logits of the original network and
                of every accepted sub-network (the ensemble knowledge, `update_knowledge`)

until MACs <= target x the original's. The weights never change. Deviation from the reference: widths
move in whole channels (step = round(0.2 x original width), at least 1), not in rounded fractions;
the residual-stream gates the reference has need projection shortcuts, which the CIFAR ResNets lack,
so only inner units are searched.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["unit_cost", "trimmed_otsu", "candidates", "update_knowledge", "CLOSED", "SubnetSearch", "Step"]

CLOSED = 1e12  # the cost of a unit that cannot narrow further (the reference's)


def unit_cost(scores: torch.Tensor, rate: float, step: float) -> float:
    """Sum of the importance of the channels a step would remove from a unit at width fraction `rate`:
    the scores sorted ascending (removed channels score 0 and come first), positions
    round((1 - rate) C) to round((1 - rate + step) C) (Python's round, as the reference)."""
    if rate <= 0:
        return CLOSED
    s = torch.sort(scores.flatten().double()).values
    c = len(s)
    return float(s[round((1 - rate) * c): round((1 - rate + step) * c)].sum())


def trimmed_otsu(costs: list[float], cut: float = 0.2) -> float:
    """Otsu's threshold over `costs` after dropping the lowest and highest ceil(len * cut) of them.

    The split t maximises t (n - t) (mean(s[:t]) - mean(s[t:]))^2 over the trimmed, sorted costs s,
    t = 1 .. n - 2 (the reference's range); the threshold is the midpoint (s[t-1] + s[t]) / 2.

    Raises:
        ValueError: fewer than 3 costs left after trimming (no split to choose).
    """
    s = sorted(float(c) for c in costs)
    trim = math.ceil(len(s) * cut)
    s = s[trim: len(s) - trim] if trim else s
    if len(s) < 3:
        raise ValueError(f"trimmed Otsu needs at least 3 costs after trimming {trim} from each end, got {len(s)}")
    best, best_t = -1.0, 1
    for t in range(1, len(s) - 1):
        lo, hi = s[:t], s[t:]
        val = t * (len(s) - t) * (sum(lo) / len(lo) - sum(hi) / len(hi)) ** 2
        if val > best:  # the first maximum, as numpy's argmax
            best, best_t = val, t
    return (s[best_t - 1] + s[best_t]) / 2


def candidates(costs: list[float], cut: float = 0.2) -> list[int]:
    """Indices of the open units whose cost is at or below the trimmed Otsu threshold of the open units'
    costs (the trimmed low outliers included); with fewer than 3 open units after trimming, all of them."""
    open_ = [c for c in costs if c < CLOSED]
    try:
        th = trimmed_otsu(open_, cut)
    except ValueError:
        th = max(open_, default=-math.inf)
    return [i for i, c in enumerate(costs) if c < CLOSED and c <= th]


def update_knowledge(knowledge: torch.Tensor, count: int, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """K <- (K * n + logits) / (n + 1): the mean logits of the n networks seen so far and this one."""
    if knowledge.shape != logits.shape:
        raise ValueError(f"knowledge {tuple(knowledge.shape)} and logits {tuple(logits.shape)} differ in shape")
    return (knowledge * count + logits.to(knowledge)) / (count + 1), count + 1


@dataclass
class Step:
    """One accepted step of the search (what the manifest records)."""

    step: int
    unit: str  # the unit narrowed
    widths: list[int]  # every unit's kept channels after the step
    macs: int
    macs_ratio: float  # of the original network's
    holdout_loss: float  # CE of the accepted sub-network on the holdout
    score: float  # CE + soft CE to the ensemble target, what the step minimised
    candidates: int  # how many units were evaluated


@contextmanager
def _batch_stat_bn(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm (batch statistics) whose running statistics do not move."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    was = model.training
    model.train()
    for m in norms:
        m.track_running_stats = False  # in train mode: batch statistics, running ones neither read nor updated
    try:
        yield
    finally:
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        model.train(was)


class SubnetSearch:
    """The search over `model`'s units, on holdout tensors (`images` normalised NCHW, `labels`).

    Args:
        model: a zoo model (`kesi_dist.models`); its weights are only read.
        target_ratio: stop once the sub-network's MACs are at most this fraction of the model's.
        step: coarse step as a fraction of each unit's original width; cut: Otsu's trim fraction.
        batch_size: holdout batch (BN statistics are per batch, as in the reference).
        macs: widths -> MACs of the sub-network (default: `count_macs` of the rebuilt architecture).
        evaluate_many: runs a step's candidate evaluations, (list of width vectors, K) -> list of
            (score, ce, logits); default here, in turn (the runtime's actor pool spreads them).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, target_ratio: float = 0.45,
                 step: float = 0.2, cut: float = 0.2, batch_size: int = 256,
                 macs: Callable[[tuple[int, ...]], int] | None = None,
                 evaluate_many: Callable[[list[list[int]], torch.Tensor], list[tuple]] | None = None):
        if not 0 < target_ratio < 1:
            raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio}")
        self.model, self.images, self.labels = model, images, labels
        self.units = model.units()
        self.full = [int(w) for w in model.widths]
        self.widths = list(self.full)
        self.steps = [max(1, round(step * c)) for c in self.full]
        self.order = [torch.arange(c) for c in self.full]  # rank of each channel, 0 = most important
        self.target, self.cut, self.batch_size = target_ratio, cut, batch_size
        self._macs = functools.lru_cache(maxsize=None)(macs or self._count_macs)
        self.base_macs = self._macs(tuple(self.full))
        self.evaluate_many = evaluate_many or (lambda ws, k: [self.evaluate(w, k) for w in ws])
        self.history: list[dict] = []  # the original network and every accepted sub-network: widths, order, loss
        score, ce, logits = self.evaluate(self.widths, None)
        self.knowledge, self.count = logits, 1
        self.history.append({"widths": list(self.widths), "order": [o.clone() for o in self.order], "loss": ce})

    # -- the sub-network ------------------------------------------------------------------------
    def _count_macs(self, widths: tuple[int, ...]) -> int:
        from kesi_dist.models import build_model
        from kesi_dist.pruning.counting import count_macs

        with torch.device("meta"):
            net = build_model(self.model.arch, self.model.num_classes, list(widths), **self.model.options)
        return count_macs(net, tuple(self.images.shape[1:]))

    def ratio(self, widths: list[int]) -> float:
        return self._macs(tuple(widths)) / self.base_macs

    @contextmanager
    def _masked(self, widths: list[int], scores: list[torch.Tensor] | None = None) -> Iterator[None]:
        """Consumers of each unit see only its `widths[i]` best channels; with `scores`, every call adds
        |sum(y * dS/dy)| per channel of the masked input y (the Taylor importance)."""
        modules = dict(self.model.named_modules())
        handles = []
        for i, unit in enumerate(self.units):
            mask = (self.order[i] < widths[i]).float()

            def pre(module, args, mask=mask, i=i):
                x = args[0]
                y = x * mask.to(x).view(1, -1, *([1] * (x.dim() - 2)))
                if scores is not None and y.requires_grad:
                    dims = [d for d in range(y.dim()) if d != 1]

                    def accumulate(g, y=y, dims=dims, i=i):  # returns None: the gradient passes unchanged
                        scores[i].add_((g * y).sum(dims).abs().detach().cpu())

                    y.register_hook(accumulate)
                return (y, *args[1:])

            for name in unit.consumers:
                handles.append(modules[name].register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _objective(self, logits: torch.Tensor, labels: torch.Tensor, knowledge: torch.Tensor | None) -> tuple:
        ce = F.cross_entropy(logits, labels, reduction="sum")
        soft = torch.zeros((), device=logits.device) if knowledge is None else \
            -(F.softmax(knowledge.to(logits), 1) * F.log_softmax(logits, 1)).sum()
        return ce + soft, ce

    def evaluate(self, widths: list[int], knowledge: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
        """(score, CE, logits) of the sub-network `widths` on the holdout: per-sample means."""
        total = ce_total = 0.0
        outs = []
        with torch.no_grad(), _batch_stat_bn(self.model), self._masked(widths):
            for a in range(0, len(self.labels), self.batch_size):
                x, y = self.images[a:a + self.batch_size], self.labels[a:a + self.batch_size]
                logits = self.model(x)
                k = None if knowledge is None else knowledge[a:a + self.batch_size]
                s, ce = self._objective(logits, y, k)
                total, ce_total = total + float(s), ce_total + float(ce)
                outs.append(logits.float().cpu())
        n = len(self.labels)
        return total / n, ce_total / n, torch.cat(outs)

    def taylor_scores(self) -> list[torch.Tensor]:
        """Importance of every channel of every unit for the current sub-network and K (A.5)."""
        scores = [torch.zeros(c, dtype=torch.float64) for c in self.full]
        params = [p for p in self.model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)  # gradients reach the activations only: the weights never change
        try:
            with _batch_stat_bn(self.model), self._masked(self.widths, scores):
                for a in range(0, len(self.labels), self.batch_size):
                    x = self.images[a:a + self.batch_size].clone().requires_grad_(True)
                    logits = self.model(x)
                    s, _ = self._objective(logits, self.labels[a:a + self.batch_size],
                                           self.knowledge[a:a + self.batch_size])
                    (s / self.batch_size).backward()
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return scores

    # -- the search -----------------------------------------------------------------------------
    def _narrowed(self, i: int) -> int:
        """Unit i's width after one step: a coarse step, refined to the widest width at or under the
        target when the coarse one would pass it (the fine search)."""
        w = max(1, self.widths[i] - self.steps[i])
        trial = list(self.widths)
        trial[i] = w
        if self.ratio(trial) < self.target:
            while trial[i] + 1 < self.widths[i]:
                trial[i] += 1
                if self.ratio(trial) > self.target:
                    trial[i] -= 1
                    break
            w = trial[i]
        return w

    def step(self) -> Step:
        scores = self.taylor_scores()
        for i, s in enumerate(scores):
            self.order[i] = torch.argsort(torch.argsort(s, descending=True, stable=True), stable=True)
        costs = [unit_cost(s, w / c, st / c) if w > 1 else CLOSED
                 for s, w, c, st in zip(scores, self.widths, self.full, self.steps)]
        picks = candidates(costs, self.cut)
        if not picks:
            raise RuntimeError("no unit can narrow further, yet the MACs target is not reached")
        trials = []
        for i in picks:
            t = list(self.widths)
            t[i] = self._narrowed(i)
            trials.append(t)
        results = self.evaluate_many(trials, self.knowledge)
        best = min(range(len(picks)), key=lambda j: results[j][0])
        score, ce, logits = results[best]
        self.widths = trials[best]
        self.knowledge, self.count = update_knowledge(self.knowledge, self.count, logits)
        self.history.append({"widths": list(self.widths), "order": [o.clone() for o in self.order], "loss": ce})
        return Step(step=len(self.history) - 1, unit=self.units[picks[best]].name, widths=list(self.widths),
                    macs=self._macs(tuple(self.widths)), macs_ratio=self.ratio(self.widths), holdout_loss=ce,
                    score=score, candidates=len(picks))

    def run(self, on_step: Callable[[Step], None] | None = None) -> list[Step]:
        """Steps until the MACs target is met; `on_step` sees each accepted step as it happens."""
        done = []
        while self.ratio(self.widths) > self.target:
            done.append(self.step())
            if on_step is not None:
                on_step(done[-1])
        return done

    def state(self) -> dict:
        """What resuming needs after an accepted step (tensors and plain values: `torch.save`-able,
        loadable with weights_only=True)."""
        return {"widths": list(self.widths), "order": [o.clone() for o in self.order],
                "knowledge": self.knowledge.clone(), "count": self.count,
                "history": [{"widths": h["widths"], "order": h["order"], "loss": h["loss"]} for h in self.history]}

    def load_state(self, state: dict) -> None:
        """Continue from `state()` of a search of the same model and holdout (a resumed run)."""
        if [len(o) for o in state["order"]] != self.full:
            raise ValueError("search state is of another architecture (unit widths differ)")
        if tuple(state["knowledge"].shape) != tuple(self.knowledge.shape):
            raise ValueError(f"search state's knowledge is {tuple(state['knowledge'].shape)}, the holdout gives "
                             f"{tuple(self.knowledge.shape)}: another holdout")
        self.widths = list(state["widths"])
        self.order = [o.clone() for o in state["order"]]
        self.knowledge, self.count = state["knowledge"].clone(), int(state["count"])
        self.history = [dict(h) for h in state["history"]]

    def keep(self) -> dict[str, torch.Tensor]:
        """Unit name -> the kept channel indices (ascending) of the current sub-network, for
        `kesi_dist.pruning.surgery.slice_units`."""
        return {u.name: torch.sort(torch.nonzero(self.order[i] < self.widths[i]).flatten()).values
                for i, u in enumerate(self.units)}
