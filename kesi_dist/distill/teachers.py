"""Which snapshots become teachers: the selection policies of the ensemble stage."""

from __future__ import annotations

import torch

from kesi_dist.errors import BadValue

__all__ = ["POLICIES", "select_teachers", "disagreement"]

POLICIES = ("chain", "all", "topk", "diverse")


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of samples on which two prediction vectors (argmax classes) differ."""
    if a.shape != b.shape:
        raise ValueError(f"prediction vectors differ in length: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).float().mean()) if a.numel() else 0.0


def select_teachers(
    policy: str,
    *,
    chain: list[str],
    candidates: dict[str, float],
    k: int,
    predictions: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Pick teacher names.

    Args:
        policy: "chain": `chain` as given (the baseline and the chosen snapshot of each iteration,
            as in the paper); "all": every candidate, in the given order; "topk": the `k` most
            accurate candidates; "diverse": greedy, see below.
        chain: names on the pruning chain, baseline first.
        candidates: every selectable snapshot, name -> validation accuracy.
        k: how many teachers for "topk" and "diverse" (all candidates if there are fewer).
        predictions: "diverse" only: name -> LongTensor of argmax predictions on the same
            validation samples (e.g. a row of `evaluate_ensemble(...)["predictions"]`).

    "diverse" starts with the most accurate candidate, then repeatedly adds the candidate c that
    maximises  acc(c) + mean over chosen s of disagreement(c, s),  where disagreement is the
    fraction of validation samples on which their predictions differ; both terms are in [0, 1].
    Ties go to the earlier candidate (order of `candidates`), so the result is deterministic.

    Returns:
        Teacher names: "chain" and "all" in their given order, "topk" and "diverse" in the order chosen.

    Raises:
        BadValue: unknown policy, k < 1, an empty choice, or missing predictions for "diverse".
    """
    if policy not in POLICIES:
        raise BadValue("policy", f"{policy!r}: must be one of {', '.join(POLICIES)}")
    if policy == "chain":
        if not chain:
            raise BadValue("chain", "the pruning chain is empty (no baseline or snapshots yet)")
        return list(chain)
    if not candidates:
        raise BadValue("candidates", f"policy {policy!r}: no candidate snapshots to choose from")
    if policy == "all":
        return list(candidates)
    if k < 1:
        raise BadValue("k", f"{k}: must be >= 1")
    order = {name: i for i, name in enumerate(candidates)}
    ranked = sorted(candidates, key=lambda n: (-candidates[n], order[n]))
    if policy == "topk":
        return ranked[:k]
    missing = [n for n in candidates if predictions is None or n not in predictions]
    if missing:
        raise BadValue("predictions", "policy 'diverse' needs validation predictions of every candidate; "
                         f"missing for {missing[0]!r}")
    chosen = [ranked[0]]
    while len(chosen) < min(k, len(candidates)):
        best, best_score = None, float("-inf")
        for name in candidates:
            if name in chosen:
                continue
            div = sum(disagreement(predictions[name], predictions[s]) for s in chosen) / len(chosen)
            score = candidates[name] + div
            if score > best_score:
                best, best_score = name, score
        chosen.append(best)
    return chosen
