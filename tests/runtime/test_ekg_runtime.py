"""EKG on the session's local Ray: the search's candidate evaluations on an actor pool, and the memory
bank's pass, each against the same computation done in one process."""

from __future__ import annotations


import pytest
import torch

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.models import build_model
from kesi_dist.train.spec import EngineSpec, LoaderSpec

HOLDOUT = 0.1

pytestmark = pytest.mark.slow  # actor pools that each load a model and data: ~40 s


def _loader(data: str) -> LoaderSpec:
    return LoaderSpec(data_dir=data, batch_size=64, resolution=16, augment="cifar", backend="torch", num_workers=0,
                      holdout=HOLDOUT, holdout_seed=0)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ekg") / "baseline.pt"
    save_checkpoint(path, build_model("resnet20", 4))
    return str(path)


def test_candidates_are_evaluated_on_two_actors_and_the_search_chooses_as_in_one_process(ray_local, tiny_data,
                                                                                         baseline):
    from kesi_dist.data.loaders import split_tensors
    from kesi_dist.methods.ekg.search import SubnetSearch
    from kesi_dist.methods.ekg.search_stage import pool_functions, search_pool

    def model():
        return model_from_checkpoint(load_checkpoint(baseline))[0]

    images, labels = split_tensors(tiny_data, "holdout", resolution=16, augment="cifar", backend="torch",
                                   holdout=HOLDOUT)
    assert len(labels) > 64  # several holdout batches: the Taylor pass is split between the actors
    kwargs = dict(target_ratio=0.7, batch_size=32, input_shape=(3, 16, 16))
    local = SubnetSearch(model(), images, labels, **kwargs)
    sequential = [local.step() for _ in range(3)]
    with search_pool(baseline, _loader(tiny_data), EngineSpec(cpus_per_worker=1), 32, 2) as pool:
        assert pool.wait(2, timeout_s=180) == 2  # both up before the first step, so both get work
        used: set[int] = set()
        evaluate_many, taylor_many = pool_functions(pool, used)
        spread = SubnetSearch(model(), **kwargs, evaluate_many=evaluate_many, taylor_many=taylor_many)
        per_step = []
        for _ in range(3):
            used.clear()
            spread.step()
            per_step.append(set(used))
        pids = {i["pid"] for i in pool.infos}
    assert all(len(u) == 2 for u in per_step), per_step  # every step's candidates ran on both actors
    assert len(pids) == 2
    got = spread.history[1:]
    assert [h["widths"] for h in got] == [s.widths for s in sequential]  # the same unit chosen every step
    assert [h["loss"] for h in got] == pytest.approx([s.holdout_loss for s in sequential], rel=1e-5)
    assert torch.allclose(spread.knowledge, local.knowledge, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(spread.order, local.order))


def test_memory_bank_pass_holds_each_teachers_logits_of_the_clean_batches(ray_local, tiny_data, baseline, tmp_path):
    from kesi_dist.data.loaders import make_loader
    from kesi_dist.distill.memory_bank_cache import MemoryBank
    from kesi_dist.errors import RunError
    from kesi_dist.pruning import slice_units
    from kesi_dist.stages.memory_bank import build_memory_bank
    from kesi_dist.train.bn import batch_statistics

    model = model_from_checkpoint(load_checkpoint(baseline))[0]
    teachers = []
    for j, keep in enumerate((8, 5)):  # two sub-networks: every unit keeps its first `keep` channels
        t = slice_units(model, {u.name: list(range(min(keep * (2 ** u.stage), w)))
                                for u, w in zip(model.units(), model.widths)})
        save_checkpoint(tmp_path / f"t{j}.pt", t)
        teachers.append(t)
    out = tmp_path / "bank"
    kwargs = dict(batch_size=64, resolution=16, backend="torch", num_actors=2, holdout=HOLDOUT, holdout_seed=0)
    meta = build_memory_bank([str(tmp_path / "t0.pt"), str(tmp_path / "t1.pt")], tiny_data, str(out), **kwargs)
    assert not meta["reused"] and meta["samples"] == meta["train_size"] - meta["holdout"]["size"]
    bank = MemoryBank(out)
    assert bank.logits.shape == (meta["train_size"], 4, 2)
    loader = make_loader(tiny_data, "train", batch_size=64, resolution=16, augment="none", backend="torch",
                         num_workers=0, shuffle=False, drop_last=False, return_indices=True, holdout=HOLDOUT)
    with torch.no_grad():
        for images, _, idx in loader:
            want = []
            for t in teachers:
                with batch_statistics(t):
                    want.append(t(images))
            torch.testing.assert_close(bank.lookup(idx), torch.stack(want, -1), rtol=1e-4, atol=1e-5)
    held = torch.tensor(meta["holdout"]["indices"][:3])
    with pytest.raises(RunError, match="no bank row"):
        bank.lookup(held)  # the held-out images have none: no student trains on them
    with pytest.raises(RunError, match="holdout"):
        bank.check(holdout=(0, 0))  # a student with another holdout is refused

    again = build_memory_bank([str(tmp_path / "t0.pt"), str(tmp_path / "t1.pt")], tiny_data, str(out), **kwargs)
    assert again["reused"] and again["key"] == meta["key"]
    shard = out / meta["shards"][0]["files"]["logits"]["name"]
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated
    with pytest.raises(RunError, match="truncated or corrupt"):
        MemoryBank(out)
    rebuilt = build_memory_bank([str(tmp_path / "t0.pt"), str(tmp_path / "t1.pt")], tiny_data, str(out), **kwargs)
    assert not rebuilt["reused"] and MemoryBank(out).logits.shape == bank.logits.shape


def test_memory_bank_fine_tuning_on_a_two_worker_ray_train_group(ray_local, tiny_data, baseline, tmp_path):
    """The EKG arm's task on Ray Train (DDP, gloo, 2 workers): each worker looks up its shard's bank rows by
    sample index and makes the views itself; the loss parts reach the epoch metrics."""
    from kesi_dist.runtime import run_training
    from kesi_dist.stages.memory_bank import build_memory_bank
    from kesi_dist.train.spec import ModelSpec, ScheduleSpec
    from kesi_dist.train.task_specs import MemoryBankSpec

    bank = tmp_path / "bank"
    build_memory_bank([baseline, baseline], tiny_data, str(bank), batch_size=64, resolution=16, backend="torch",
                      num_actors=1, holdout=HOLDOUT, holdout_seed=0)
    result = run_training(
        model=ModelSpec(arch="", init_checkpoint=baseline), schedule=ScheduleSpec(epochs=1, lr=0.01, schedule="constant"),
        loader=_loader(tiny_data), engine=EngineSpec(num_workers=2, cpus_per_worker=1), storage_path=str(tmp_path / "t"),
        name="ekg_arm", max_steps_per_epoch=2, progress=False,
        task=MemoryBankSpec(memory_bank=str(bank), views=2, temperature=4.0))
    m = result.metrics
    assert m["world_size"] == 2 and m["images"] == 2 * 64  # 2 steps of the global batch, over both workers
    assert m["train/kd_loss"] >= 0 and m["train/task_loss"] > 0 and 1 <= m["train/teachers_used"] <= 2
    assert 0 <= m["holdout/acc"] <= 1 and 0 <= m["val/acc"] <= 1
