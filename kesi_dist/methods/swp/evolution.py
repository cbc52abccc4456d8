"""SWP's search: regularised evolution under a MACs budget, plain Python (OFA's
ofa/nas/search_algorithm/evolution.py).

A candidate is one width per unit, each from that unit's choices. Every candidate (random, mutated or
crossed over) is resampled until its MACs lie in the band [lo, hi], so the search can never return a
net over budget. Each generation keeps the best `parents` fraction, fills the rest with mutations of
random parents (each unit redrawn with `mutate_prob`) and crossovers of two (each unit from either),
and evaluates the new ones with `fitness_many` (a whole generation at once: the caller spreads it over
actors). Randomness is seeded per generation, so a search resumed from a saved generation goes on
exactly as the uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Callable

__all__ = ["Evolution", "sample_in_band"]

Widths = tuple[int, ...]


def sample_in_band(rng: random.Random, propose: Callable[[], list[int]], macs: Callable[[list[int]], int],
                   lo: float, hi: float, tries: int = 20000) -> Widths:
    """`propose()` until its MACs lie in [lo, hi]."""
    for _ in range(tries):
        w = propose()
        if lo <= macs(w) <= hi:
            return tuple(w)
    raise ValueError(f"no candidate in the MACs band [{lo:.0f}, {hi:.0f}] after {tries} draws; widen the band or "
                     "give finer width choices")


class Evolution:
    """Args:
        choices: per unit, its allowed widths.
        macs: widths -> MACs; lo, hi: the band every candidate must lie in.
        fitness_many: list of candidates -> their fitness (higher is better), in order.
    """

    def __init__(self, choices: list[list[int]], macs: Callable[[list[int]], int], lo: float, hi: float,
                 fitness_many: Callable[[list[Widths]], list[float]], *, population: int = 50,
                 parents: float = 0.25, mutation: float = 0.5, mutate_prob: float = 0.1, seed: int = 0):
        self.choices, self.macs, self.lo, self.hi = choices, macs, lo, hi
        self.fitness_many = fitness_many
        self.population, self.mutate_prob, self.seed = population, mutate_prob, seed
        self.n_parents = max(1, round(parents * population))
        self.n_mutate = round(mutation * (population - self.n_parents))
        self.fitness: dict[Widths, float] = {}  # every candidate evaluated so far
        self.current: list[Widths] = []
        self.generation = 0
        self.history: list[dict] = []

    def _rng(self) -> random.Random:
        return random.Random(f"{self.seed}-{self.generation}")

    def _sample(self, rng: random.Random, propose: Callable[[], list[int]]) -> Widths:
        return sample_in_band(rng, propose, self.macs, self.lo, self.hi)

    def _evaluate(self, cands: list[Widths]) -> None:
        new = list(dict.fromkeys(c for c in cands if c not in self.fitness))
        for c, f in zip(new, self.fitness_many(new) if new else []):
            self.fitness[c] = float(f)

    def _record(self) -> dict:
        fits = [self.fitness[c] for c in self.current]
        best = max(self.current, key=lambda c: self.fitness[c])
        rec = {"generation": self.generation, "best": max(fits), "mean": sum(fits) / len(fits),
               "best_widths": list(best), "best_macs": self.macs(list(best)), "evaluated": len(self.fitness)}
        self.history.append(rec)
        return rec

    def start(self) -> dict:
        """Generation 0: a random population in the band."""
        rng = self._rng()
        self.current = [self._sample(rng, lambda: [rng.choice(c) for c in self.choices])
                        for _ in range(self.population)]
        self._evaluate(self.current)
        return self._record()

    def step(self) -> dict:
        """One generation: parents, mutations, crossovers; returns its record."""
        self.generation += 1
        rng = self._rng()
        ranked = sorted(dict.fromkeys(self.current), key=lambda c: self.fitness[c], reverse=True)
        parents = ranked[:self.n_parents]
        children: list[Widths] = []
        for _ in range(self.n_mutate):
            p = rng.choice(parents)
            children.append(self._sample(rng, lambda: [rng.choice(c) if rng.random() < self.mutate_prob else w
                                                       for w, c in zip(p, self.choices)]))
        while len(parents) + len(children) < self.population:
            a, b = rng.choice(parents), rng.choice(parents)
            children.append(self._sample(rng, lambda: [rng.choice((x, y)) for x, y in zip(a, b)]))
        self._evaluate(children)
        self.current = parents + children
        return self._record()

    def best(self) -> tuple[Widths, float]:
        """The fittest candidate ever evaluated (all lie in the band)."""
        c = max(self.fitness, key=lambda k: self.fitness[k])
        return c, self.fitness[c]

    def state(self) -> dict:
        """Plain data to resume from (JSON-able)."""
        return {"generation": self.generation, "current": [list(c) for c in self.current],
                "fitness": [[list(c), f] for c, f in self.fitness.items()], "history": self.history}

    def load_state(self, state: dict) -> None:
        self.generation = int(state["generation"])
        self.current = [tuple(c) for c in state["current"]]
        self.fitness = {tuple(c): float(f) for c, f in state["fitness"]}
        self.history = list(state["history"])
