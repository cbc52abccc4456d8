"""KD losses, top-k truncation and teacher selection: pure torch, no files, no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kesi_dist.distill import dense_from_topk, kd_loss, select_teachers, topk_probs, truncation_bound
from kesi_dist.distill.teachers import disagreement
from kesi_dist.errors import BadValue


def _batch(b=16, c=10, teachers=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(b, c, generator=g, dtype=dtype)).requires_grad_(True)
    t = [3 * torch.randn(b, c, generator=g, dtype=dtype) for _ in range(teachers)]
    return s, t, torch.randint(0, c, (b,), generator=g)


def test_kd_of_mean_probs_has_the_gradient_of_mean_per_teacher_kl():
    T = 5.0
    s, ts, _ = _batch()
    # METHOD.md: mean over teachers of KL(softmax(t_i/T) || softmax(s/T)) * T^2, written out by hand.
    log_q = F.log_softmax(s / T, 1)
    per_teacher = []
    for t in ts:
        p = F.softmax(t / T, 1)
        per_teacher.append((p * (p.log() - log_q)).sum(1).mean() * T * T)
    reference = torch.stack(per_teacher).mean()
    (g_ref,) = torch.autograd.grad(reference, s)

    p_bar = torch.stack([F.softmax(t / T, 1) for t in ts]).mean(0)
    out = kd_loss(s, p_bar, temperature=T)
    (g_ours,) = torch.autograd.grad(out["kd_loss"], s)
    assert torch.allclose(g_ours.double(), g_ref, atol=1e-6, rtol=0)
    assert g_ref.abs().max() > 1e-3  # a real gradient, not two zeros
    # The values differ only by a constant that does not depend on the student: the teachers' entropy gap.
    assert out["kd_loss"].item() <= reference.item() + 1e-6


def test_kd_loss_mixes_ce_with_alpha_and_reports_parts():
    T = 4.0
    s, ts, labels = _batch(c=5)
    p = torch.stack([F.softmax(t / T, 1) for t in ts]).mean(0)
    soft = kd_loss(s, p, labels, temperature=T)
    assert soft["loss"].item() == pytest.approx(soft["kd_loss"].item())
    assert soft["task_loss"].item() == pytest.approx(F.cross_entropy(s.float(), labels).item(), rel=1e-6)
    mixed = kd_loss(s, p, labels, temperature=T, alpha=0.3)
    assert mixed["loss"].item() == pytest.approx(0.7 * soft["kd_loss"].item() + 0.3 * soft["task_loss"].item(), rel=1e-6)
    # identical distributions: zero KL
    same = kd_loss(s.detach(), F.softmax(s.detach() / T, 1), temperature=T)
    assert abs(same["kd_loss"].item()) < 1e-5
    with pytest.raises(ValueError, match="pass labels"):
        kd_loss(s, p, None, temperature=T, alpha=0.5)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(s, p[:, :3], temperature=T)


def test_topk_roundtrip_is_exact_with_all_classes():
    s, ts, _ = _batch(c=7, dtype=torch.float32)
    p = F.softmax(ts[0], 1)
    v, i = topk_probs(p, 7)
    assert torch.equal(dense_from_topk(v, i, 7), p)
    v, i = topk_probs(p, 50)  # k beyond the classes keeps them all
    assert v.shape == (16, 7) and torch.equal(dense_from_topk(v, i, 7), p)


def test_truncated_distribution_spreads_the_rest_uniformly_and_stays_within_the_bound():
    T = 5.0
    s, ts, _ = _batch(b=64, c=10, dtype=torch.float32)
    p = torch.stack([F.softmax(t / T, 1) for t in ts]).mean(0)
    for k in (1, 3, 6, 9):
        v, i = topk_probs(p, k)
        d = dense_from_topk(v, i, 10)
        assert torch.allclose(d.sum(1), torch.ones(64), atol=1e-6)
        assert torch.equal(d.gather(1, i), v)  # the kept classes are untouched
        tail = torch.ones_like(d, dtype=torch.bool).scatter_(1, i, False)
        rest = (1 - v.sum(1, keepdim=True)) / (10 - k)
        assert torch.allclose(d[tail].view(64, -1), rest.expand(64, 10 - k), atol=1e-7)
        gap = abs(kd_loss(s, d, temperature=T)["kd_loss"].item() - kd_loss(s, p, temperature=T)["kd_loss"].item())
        bound = truncation_bound(s, v, i, temperature=T).item()
        assert gap <= bound + 1e-5, (k, gap, bound)
    assert truncation_bound(s, *topk_probs(p, 10), temperature=T).item() == 0


def test_select_chain_all_topk():
    cands = {"base": 0.90, "it1": 0.85, "it1b": 0.88, "it2": 0.80}
    chain = ["base", "it1", "it2"]
    assert select_teachers("chain", chain=chain, candidates=cands, k=2) == chain
    assert select_teachers("all", chain=chain, candidates=cands, k=2) == list(cands)
    assert select_teachers("topk", chain=chain, candidates=cands, k=2) == ["base", "it1b"]
    assert select_teachers("topk", chain=chain, candidates=cands, k=10) == ["base", "it1b", "it1", "it2"]
    with pytest.raises(BadValue, match="must be one of"):
        select_teachers("best", chain=chain, candidates=cands, k=2)
    with pytest.raises(BadValue, match="k: 0: must be >= 1"):
        select_teachers("topk", chain=chain, candidates=cands, k=0)
    with pytest.raises(BadValue, match="chain"):
        select_teachers("chain", chain=[], candidates=cands, k=2)


def test_select_diverse_trades_accuracy_for_disagreement():
    labels = torch.arange(10) % 3
    a = labels.clone()                      # acc 1.0
    b = labels.clone()                      # a clone of a: acc 1.0, disagreement 0
    c = labels.clone(); c[:3] = (c[:3] + 1) % 3   # acc 0.7, disagrees with a on 0.3
    d = labels.clone(); d[5:] = (d[5:] + 1) % 3   # acc 0.5, disagrees with a on 0.5
    preds = {"a": a, "b": b, "c": c, "d": d}
    acc = {n: float((p == labels).float().mean()) for n, p in preds.items()}
    assert disagreement(a, d) == pytest.approx(0.5)
    # step 2: b scores 1.0 + 0, c 0.7 + 0.3 = 1.0, d 0.5 + 0.5 = 1.0 -> tie -> the earlier, b.
    # Make the clone slightly worse so diversity decides: scores b 0.95, c 1.0, d 1.0 -> c.
    acc["b"] = 0.95
    got = select_teachers("diverse", chain=[], candidates=acc, k=3, predictions=preds)
    assert got[0] == "a" and got[1] == "c"
    # step 3 against {a, c}: b 0.95 + (0 + 0.3)/2 = 1.10; d 0.5 + (0.5 + 0.8)/2 = 1.15 -> d
    assert disagreement(c, d) == pytest.approx(0.8)
    assert got == ["a", "c", "d"]
    assert select_teachers("topk", chain=[], candidates=acc, k=3) == ["a", "b", "c"]
    with pytest.raises(BadValue, match="predictions"):
        select_teachers("diverse", chain=[], candidates=acc, k=2, predictions={"a": a})


def test_kd_scale_is_the_textbook_per_sample_kl_times_t_squared():
    """kd_loss == mean over samples of KL(p_t || p_s) * T^2, KL summed over classes (not averaged), and
    equals the reference code's form F.kl_div(..., reduction="mean") * C * T^2."""
    torch.manual_seed(0)
    s, t, T = torch.randn(6, 7), torch.randn(6, 7), 4.0
    p = F.softmax(t / T, 1)
    q = F.softmax(s / T, 1)
    textbook = sum(float((p[b] * (p[b].log() - q[b].log())).sum()) for b in range(6)) / 6 * T**2
    got = float(kd_loss(s, p, temperature=T)["kd_loss"])
    assert got == pytest.approx(textbook, rel=1e-5)
    reference = float(F.kl_div(F.log_softmax(s / T, 1), p, reduction="mean") * 7 * T**2)
    assert got == pytest.approx(reference, rel=1e-5)
