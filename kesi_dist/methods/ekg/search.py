"""EKG's greedy, training-free sub-network search, plain PyTorch (Lee & Song, ECCV 2022; reference
code sseung0703/EKG).

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

until MACs <= target x the original's. The weights never change. Two roles: `SubnetEvaluator`
(evaluator.py) holds a model and the holdout tensors and evaluates or scores a sub-network (what an
actor of the runtime's pool holds); `SubnetSearch` is the greedy loop, which only needs the results
(the driver keeps it).
Deviation from the reference: widths move in whole channels (step = round(0.2 x original width), at
least 1), not in rounded fractions; the residual-stream gates the reference has need projection
shortcuts, which the CIFAR ResNets lack, so only inner units are searched.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kesi_dist.methods.ekg.evaluator import Order, Result, SubnetEvaluator
from kesi_dist.pruning import align, macs_function
from kesi_dist.pruning import uniform_widths as widest_uniform

__all__ = ["unit_cost", "trimmed_otsu", "candidates", "update_knowledge", "CLOSED", "SubnetSearch", "Step",
           "uniform_widths"]

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


def uniform_widths(model: nn.Module, target_ratio: float, input_shape: tuple, round_to: int = 1,
                   cost: Callable[[list[int]], float] | None = None) -> list[int]:
    """The uniform comparison arm's widths at `target_ratio` of `model`'s MACs, or of `cost` (a budget's,
    `kesi_dist.budget`) when given (`kesi_dist.pruning.uniform_widths`), multiples of `round_to`."""
    return widest_uniform(model.widths, cost or macs_function(model, tuple(input_shape)), target_ratio, round_to)


@dataclass
class Step:
    """One accepted step of the search (what the manifest records)."""

    step: int
    unit: str  # the unit narrowed
    widths: list[int]  # every unit's kept channels after the step
    macs: int
    macs_ratio: float  # of the original network's
    budget_ratio: float  # what the target bounds: the MACs ratio, or the predicted latency's with `cost`
    holdout_loss: float  # CE of the accepted sub-network on the holdout
    score: float  # CE + soft CE to the ensemble target, what the step minimised
    candidates: int  # how many units were evaluated


class SubnetSearch:
    """The greedy search over `model`'s units.

    Args:
        model: a zoo model (`kesi_dist.models`); its weights are only read.
        images, labels: the holdout tensors, for the default local `SubnetEvaluator` (not needed when
            both `evaluate_many` and `taylor_many` are given).
        target_ratio: stop once the sub-network's MACs are at most this fraction of the model's.
        step: coarse step as a fraction of each unit's original width; cut: Otsu's trim fraction.
        cost: widths -> what the target bounds (`kesi_dist.budget.Budget.cost`: MACs, a latency table's
            prediction, ...); None: MACs, the reference's.
        round_to: widths move in multiples of this (the coarse step and the fine search alike; a unit
            stops at one multiple), so every sub-network has aligned widths; 1 is the reference's.
        batch_size: holdout batch (BN statistics are per batch, as in the reference).
        input_shape: (C, H, W) the MACs are counted at (default: the images').
        evaluate_many: runs a step's candidate evaluations, (width vectors, order, K) -> list of
            (score, ce, logits) in the same order; default: the local evaluator, in turn.
        taylor_many: (widths, order, K) -> per holdout batch, in order, every unit's channel scores;
            default: the local evaluator. The runtime's actor pool spreads both over actors.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                 target_ratio: float = 0.45, step: float = 0.2, cut: float = 0.2, batch_size: int = 256,
                 input_shape: tuple | None = None, round_to: int = 1,
                 cost: Callable[[list[int]], float] | None = None,
                 evaluate_many: Callable[[list[list[int]], Order, torch.Tensor | None], list[Result]] | None = None,
                 taylor_many: Callable[[list[int], Order, torch.Tensor], list[list[torch.Tensor]]] | None = None):
        if not 0 < target_ratio < 1:
            raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio}")
        self.model = model
        self.units = model.units()
        self.full = [int(w) for w in model.widths]
        self.widths = list(self.full)
        self.round_to = int(round_to)
        if self.round_to > 1:
            self.steps = [align(step * c, self.round_to) for c in self.full]
            self.floors = [min(self.round_to, c) for c in self.full]
        else:
            self.steps = [max(1, round(step * c)) for c in self.full]
            self.floors = [1] * len(self.full)
        self.order: Order = [torch.arange(c) for c in self.full]
        self.target, self.cut = target_ratio, cut
        self._macs = functools.lru_cache(maxsize=None)(macs_function(model, tuple(input_shape or images.shape[1:])))
        self.base_macs = self._macs(tuple(self.full))
        self._cost = cost
        self.base_cost = cost(list(self.full)) if cost is not None else None
        self.evaluator = None
        if evaluate_many is None or taylor_many is None:
            self.evaluator = SubnetEvaluator(model, images, labels, batch_size=batch_size)
        ev = self.evaluator
        self.evaluate_many = evaluate_many or (lambda ws, order, k: [ev.evaluate(w, order, k) for w in ws])
        self.taylor_many = taylor_many or ev.taylor
        self.history: list[dict] = []  # the original network and every accepted sub-network: widths, order, loss
        score, ce, logits = self.evaluate_many([self.widths], self.order, None)[0]
        self.knowledge, self.count = logits, 1
        self.history.append({"widths": list(self.widths), "order": [o.clone() for o in self.order], "loss": ce})

    # -- the sub-network ------------------------------------------------------------------------
    def ratio(self, widths: list[int]) -> float:
        """What the target bounds, relative to the original network: MACs, or the `cost` given."""
        if self._cost is not None:
            return self._cost(list(widths)) / self.base_cost
        return self.macs_ratio(widths)

    def macs_ratio(self, widths: list[int]) -> float:
        return self._macs(tuple(widths)) / self.base_macs

    def macs(self, widths: list[int]) -> int:
        return self._macs(tuple(widths))

    def _masked(self, widths: list[int]):
        return self.evaluator.masked(widths, self.order)

    def taylor_scores(self) -> list[torch.Tensor]:
        """Importance of every channel of every unit for the current sub-network and K (A.5): the
        per-batch scores summed in batch order."""
        scores = [torch.zeros(c, dtype=torch.float64) for c in self.full]
        for batch in self.taylor_many(self.widths, self.order, self.knowledge):
            for total, s in zip(scores, batch):
                total.add_(s)
        return scores

    # -- the search -----------------------------------------------------------------------------
    def _narrowed(self, i: int) -> int:
        """Unit i's width after one step: a coarse step, refined to the widest width at or under the
        target when the coarse one would pass it (the fine search)."""
        n = self.round_to
        w = max(self.floors[i], self.widths[i] - self.steps[i])
        trial = list(self.widths)
        trial[i] = w
        if self.ratio(trial) < self.target:
            while trial[i] + n < self.widths[i]:
                trial[i] += n
                if self.ratio(trial) > self.target:
                    trial[i] -= n
                    break
            w = trial[i]
        return w

    def step(self) -> Step:
        scores = self.taylor_scores()
        for i, s in enumerate(scores):
            self.order[i] = torch.argsort(torch.argsort(s, descending=True, stable=True), stable=True)
        costs = [unit_cost(s, w / c, st / c) if w > f else CLOSED
                 for s, w, c, st, f in zip(scores, self.widths, self.full, self.steps, self.floors)]
        picks = candidates(costs, self.cut)
        if not picks:
            raise RuntimeError("no unit can narrow further, yet the MACs target is not reached")
        trials = []
        for i in picks:
            t = list(self.widths)
            t[i] = self._narrowed(i)
            trials.append(t)
        results = self.evaluate_many(trials, self.order, self.knowledge)
        best = min(range(len(picks)), key=lambda j: results[j][0])
        score, ce, logits = results[best]
        self.widths = trials[best]
        self.knowledge, self.count = update_knowledge(self.knowledge, self.count, logits)
        self.history.append({"widths": list(self.widths), "order": [o.clone() for o in self.order], "loss": ce})
        return Step(step=len(self.history) - 1, unit=self.units[picks[best]].name, widths=list(self.widths),
                    macs=self.macs(self.widths), macs_ratio=self.macs_ratio(self.widths),
                    budget_ratio=self.ratio(self.widths), holdout_loss=ce,
                    score=score, candidates=len(picks))

    def done(self) -> bool:
        return self.ratio(self.widths) <= self.target

    def run(self, on_step: Callable[[Step], None] | None = None) -> list[Step]:
        """Steps until the MACs target is met; `on_step` sees each accepted step as it happens."""
        done = []
        while not self.done():
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

    def keep(self, entry: dict | None = None) -> dict[str, torch.Tensor]:
        """Unit name -> the kept channel indices (ascending) of the current sub-network (or of a
        `history` entry), for `kesi_dist.pruning.surgery.slice_units`."""
        widths, order = (self.widths, self.order) if entry is None else (entry["widths"], entry["order"])
        return {u.name: torch.sort(torch.nonzero(order[i] < widths[i]).flatten()).values
                for i, u in enumerate(self.units)}
