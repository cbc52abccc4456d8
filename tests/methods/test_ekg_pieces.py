"""EKG's pure pieces against hand-computed values (no Ray, no files)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kesi_dist.distill.curriculum import curriculum_target, kld_t, memory_bank_loss
from kesi_dist.methods.ekg.teacher_pick import pick_teachers
from kesi_dist.methods.ekg.search import CLOSED, candidates, trimmed_otsu, unit_cost, update_knowledge


def test_trimmed_otsu_by_hand():
    # sorted: 0.5 1 2 3 9 10 11 12 50 100; trim ceil(10 * 0.2) = 2 each side -> 2 3 9 10 11 12
    # t=1: 1*5*(2-9)^2 = 245; t=2: 2*4*(2.5-10.5)^2 = 512; t=3: 9*(14/3-11)^2 = 361; t=4: 8*(6-11.5)^2 = 242
    # best t = 2 -> threshold (3 + 9) / 2 = 6
    costs = [1, 2, 3, 10, 11, 12, 50, 0.5, 100, 9]
    assert trimmed_otsu(costs) == 6.0
    assert candidates(costs) == [0, 1, 2, 7]  # 1, 2, 3 and the trimmed low outlier 0.5
    assert candidates(costs + [CLOSED]) == [0, 1, 2, 7]  # a closed unit is never a candidate nor counted
    with pytest.raises(ValueError, match="at least 3"):
        trimmed_otsu([1.0, 2.0, 3.0])  # trim 1 from each end leaves 1


def test_unit_cost_sums_the_next_channels_to_go():
    scores = torch.tensor([5.0, 0.0, 3.0, 1.0, 0.0, 4.0, 2.0, 6.0, 7.0, 8.0])  # 2 already pruned (score 0)
    # sorted: 0 0 1 2 3 4 5 6 7 8; rate 0.8 -> positions round(0.2*10)=2 .. round(0.4*10)=4: 1 + 2
    assert unit_cost(scores, rate=0.8, step=0.2) == 3.0
    assert unit_cost(scores, rate=1.0, step=0.2) == 0.0  # the two zeros go first
    assert unit_cost(scores, rate=0.0, step=0.2) == CLOSED


def test_knowledge_is_the_running_mean_of_logits():
    k, n = torch.tensor([[1.0, 2.0]]), 1
    k, n = update_knowledge(k, n, torch.tensor([[3.0, 0.0]]))
    assert n == 2 and torch.equal(k, torch.tensor([[2.0, 1.0]]))
    k, n = update_knowledge(k, n, torch.tensor([[5.0, 3.0]]))
    assert n == 3 and torch.allclose(k, torch.tensor([[3.0, 5.0 / 3.0]]))  # mean of the three


def test_memory_bank_teachers_are_spread_in_loss():
    # sorted losses .5 .6 .9 1.0 1.3 1.5 2.0; step (2.0 - .5) / 5 = .3; targets .5 .8 1.1 1.4 1.7
    # nearest unused: .5 -> .5, .8 -> .9, 1.1 -> 1.0, 1.4 -> 1.3 (first of two at .1), 1.7 -> 1.5
    losses = [1.3, 0.5, 2.0, 0.9, 0.6, 1.5, 1.0]  # history order, not sorted
    assert [losses[i] for i in pick_teachers(losses, 5)] == [0.5, 0.9, 1.0, 1.3, 1.5]
    assert pick_teachers([0.3, 0.1], 5) == [1, 0]  # fewer entries than teachers: all, best first


def test_curriculum_keeps_the_teachers_closer_to_the_best_than_the_student():
    best, same, other = torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    bank = torch.stack([best, same, other], -1)[None]  # [1, 2, 3]
    # A student near the best teacher: only the teachers at distance 0 (best, same) are closer.
    target, used = curriculum_target(bank, torch.tensor([[1.5, 0.0]]), temperature=1.0)
    assert used.tolist() == [True, True, False] and torch.allclose(target, best[None])
    # A student far away (wrong class): every teacher is closer; the target is their mean logits.
    target, used = curriculum_target(bank, torch.tensor([[-3.0, 0.0]]), temperature=1.0)
    assert used.tolist() == [True, True, True] and torch.allclose(target, torch.tensor([[4 / 3, 2 / 3]]))


def test_memory_bank_loss_is_ce_plus_t_times_kl_over_views():
    torch.manual_seed(0)
    views, labels, bank, T = torch.randn(4, 2, 5), torch.tensor([0, 1, 2, 3]), torch.randn(4, 5, 3), 4.0
    out = memory_bank_loss(views, labels, bank, temperature=T)
    target, _ = curriculum_target(bank, views.mean(1), T)
    ce = sum(F.cross_entropy(views[:, v], labels) for v in range(2)) / 2
    p = F.softmax(target / T, 1)
    kd = sum((T * (p * (F.log_softmax(target / T, 1) - F.log_softmax(views[:, v] / T, 1))).sum(1)).mean()
             for v in range(2)) / 2
    assert float(out["task_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(out["kd_loss"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(ce + kd), rel=1e-5)
    assert float(kld_t(target, target, T).abs().max()) < 1e-6 and not math.isnan(float(out["loss"]))


@pytest.fixture(scope="module")
def toy():
    """A random-weight ResNet-20 (4 classes) and a 16-image holdout at 8 px (two batches of 8): only the
    mechanics matter, and a search's cost is its steps times the holdout's batches."""
    from kesi_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4).eval()
    return model, torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))


def test_search_lands_on_the_widest_sub_network_under_the_target(toy):
    from kesi_dist.methods.ekg.search import SubnetSearch

    model, x, y = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = SubnetSearch(model, x, y, target_ratio=0.6, batch_size=8)  # ~20 steps (0.45: ~30)
    steps = search.run()
    assert steps and steps[-1].macs_ratio <= 0.6 < steps[-2].macs_ratio
    assert [s.macs for s in steps] == sorted((s.macs for s in steps), reverse=True)
    assert len(search.history) == len(steps) + 1 and search.count == len(steps) + 1
    # The last step's unit is as wide as the target allows: one more channel would pass it.
    last = [u.name for u in search.units].index(steps[-1].unit)
    wider = list(search.widths)
    wider[last] += 1
    assert search.ratio(wider) > 0.6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN stats untouched


def test_search_with_round_to_moves_in_multiples_and_lands_on_the_widest_aligned_net(toy):
    from kesi_dist.methods.ekg.search import SubnetSearch

    model, x, y = toy
    search = SubnetSearch(model, x, y, target_ratio=0.6, batch_size=8, round_to=4)
    assert search.steps == [4] * 3 + [8] * 3 + [12] * 3  # round(0.2 C) aligned: 3.2 -> 4, 6.4 -> 8, 12.8 -> 12
    steps = search.run()
    assert all(w % 4 == 0 for s in steps for w in s.widths)
    assert steps[-1].macs_ratio <= 0.6 < steps[-2].macs_ratio
    last = [u.name for u in search.units].index(steps[-1].unit)
    wider = list(search.widths)
    wider[last] += 4
    assert search.ratio(wider) > 0.6 or wider[last] >= steps[-2].widths[last]


def test_scores_and_kept_channels_match_the_sliced_network(toy):
    from kesi_dist.methods.ekg.search import SubnetSearch
    from kesi_dist.pruning.surgery import slice_units

    model, x, y = toy
    search = SubnetSearch(model, x, y, target_ratio=0.6, batch_size=8)
    search.step()
    scores = search.taylor_scores()
    for i, w in enumerate(search.widths):
        gone = search.order[i] >= w
        assert torch.all(scores[i][gone] == 0) and torch.all(scores[i][~gone] >= 0)  # pruned channels: y = 0
    keep = search.keep()
    assert [len(keep[u.name]) for u in search.units] == search.widths
    small = slice_units(model, keep).eval()
    with torch.no_grad(), search._masked(search.widths):
        masked = model.eval()(x)
    torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # seconds: kept out of the fast part
def test_a_search_resumed_from_its_state_continues_where_it_stopped(toy, tmp_path):
    """Saved after step 2 (as a stage does after every accepted step) and reloaded in a new search: the
    remaining steps are those of an uninterrupted search."""
    from kesi_dist.checkpoint import load_tensors
    from kesi_dist.methods.ekg.search import SubnetSearch

    model, x, y = toy
    full = SubnetSearch(model, x, y, target_ratio=0.5, batch_size=8)
    whole = full.run()
    first = SubnetSearch(model, x, y, target_ratio=0.5, batch_size=8)
    first.step(), first.step()
    torch.save(first.state(), tmp_path / "search.pt")
    resumed = SubnetSearch(model, x, y, target_ratio=0.5, batch_size=8)
    resumed.load_state(load_tensors(tmp_path / "search.pt"))  # weights_only=True
    rest = resumed.run()
    assert [s.unit for s in rest] == [s.unit for s in whole[2:]] and resumed.widths == full.widths
    assert torch.allclose(resumed.knowledge, full.knowledge) and len(resumed.history) == len(full.history)


def test_uniform_widths_are_the_widest_uniform_net_under_the_target():
    from kesi_dist.methods.ekg.search import uniform_widths
    from kesi_dist.models import build_model
    from kesi_dist.pruning import count_macs

    model = build_model("resnet20", 10)
    shape = (3, 16, 16)
    widths = uniform_widths(model, 0.45, shape)
    macs = lambda w: count_macs(build_model("resnet20", 10, list(w)), shape)  # noqa: E731
    base = macs(model.widths)
    assert macs(widths) <= 0.45 * base
    # Uniform: one fraction f gives every unit's round(f * C): the units' intervals of f intersect.
    lo = max((w - 0.5) / c for w, c in zip(widths, model.widths))
    hi = min((w + 0.5) / c for w, c in zip(widths, model.widths))
    assert lo <= hi
    # The next fraction that widens any unit passes the target: no wider uniform net fits.
    f = hi + 1e-9
    assert macs([max(1, round(f * c)) for c in model.widths]) > 0.45 * base


def test_views_replay_by_seed_epoch_and_index_and_differ_between_views():
    from kesi_dist.data.augment import views

    torch.manual_seed(0)
    images, indices = torch.randn(6, 3, 8, 8), torch.arange(10, 16)
    a = views(images, indices, seed=3, epoch=1, count=2, pad=2)
    assert a.shape == (12, 3, 8, 8)
    assert torch.equal(a, views(images, indices, seed=3, epoch=1, count=2, pad=2))  # replayable
    # A sample's views depend on its index, not its place in the batch.
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    b = views(images[perm], indices[perm], seed=3, epoch=1, count=2, pad=2)
    assert torch.equal(b.view(6, 2, 3, 8, 8)[perm.argsort()], a.view(6, 2, 3, 8, 8))
    assert not torch.equal(a[0::2], a[1::2])  # two views are two draws
    assert not torch.equal(a, views(images, indices, seed=3, epoch=2, count=2, pad=2))  # a new epoch, new views
    # Each view is a flip and/or shift of the reflect-padded image: its pixels come from that image.
    pad = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    v = a[0]
    found = any(torch.equal(v, c) or torch.equal(v, c.flip(2))
                for c in (pad[0, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)))
    assert found


def test_memory_bank_task_is_the_curriculum_loss_over_the_views():
    from kesi_dist.data.augment import views
    from kesi_dist.models import build_model
    from kesi_dist.train.tasks import MemoryBankDistillation

    class Bank:
        def __init__(self, logits):
            self.logits = logits

        def lookup(self, idx):
            return self.logits[idx]

    torch.manual_seed(0)
    model = build_model("resnet20", 4).eval()
    bank = Bank(torch.randn(20, 4, 3))
    task = MemoryBankDistillation(bank, temperature=4.0, views=2, seed=7, pad=2)
    task.set_epoch(3)
    x, y, idx = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0]), torch.tensor([4, 9, 1, 17, 0])
    out = task(model, x, y, idx)
    with torch.no_grad():
        logits = model(views(x, idx, seed=7, epoch=3, count=2, pad=2)).view(5, 2, 4)
    expected = memory_bank_loss(logits, y, bank.logits[idx], temperature=4.0)
    assert float(out.loss.detach()) == pytest.approx(float(expected["loss"]), rel=1e-5)
    assert torch.allclose(out.logits, logits[:, 0], atol=1e-5) and "kd_loss" in out.parts
    assert task.needs_indices and task.augments
