"""Same config + same seed -> the same weights, the same pruning decisions, the same snapshot widths.

Plain PyTorch on the real training path (`run_training` with num_workers=0 runs the Ray Train worker
function in this process), the real loader with augmentation (the torch backend over the .beton
files: it yields what FFCV yields to 1e-5, tests/test_data_loaders.py, and needs no JIT compile), and
the real pruning functions.
Also with the FFCV loader (the default for real data). Two 2-worker Ray Train runs with the same seed
train the same weights (tests/runtime/test_worker_kill.py: a killed-and-restarted run equals an
uninterrupted one), and a 1-worker TorchTrainer the in-process loop's (tests/runtime/test_train_ray.py).
What is and is not bitwise reproducible beyond this is documented in docs/failure-handling.md ("Reproducibility").
"""

from __future__ import annotations

import pytest

import torch

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.runtime import run_training
from kesi_dist.pruning import apply_masks, mwp_masks, pfec_prune
from kesi_dist.pruning import kept_count, l1_keep_indices, unit_ratios
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

RATIOS = [0.3, 0.3, 0.3]


def _train(tiny_data: str, tmp_path, name: str, seed: int, backend: str = "torch"):
    """Six steps of ResNet-20 on the tiny dataset, written as a kesi checkpoint; returns the model."""
    final = tmp_path / f"{name}.pt"
    run_training(model=ModelSpec(arch="resnet20", num_classes=4),
                 schedule=ScheduleSpec(epochs=1, lr=0.1, schedule="onecycle"),
                 loader=LoaderSpec(data_dir=tiny_data, batch_size=64, resolution=16, augment="cifar",
                                   backend=backend, num_workers=0 if backend == "torch" else 1),
                 engine=EngineSpec(num_workers=0), storage_path=str(tmp_path / "train"), name=name, seed=seed,
                 final_checkpoint=str(final), progress=False, max_steps_per_epoch=6)
    return model_from_checkpoint(load_checkpoint(final))[0]


def _decisions(model) -> dict[str, list[int]]:
    """Kept filter indices of every PFEC unit (what `pfec_prune` keeps)."""
    units = model.units()
    ratios = unit_ratios(units, RATIOS, (), {})
    sd = model.state_dict()
    return {u.name: l1_keep_indices(sd[f"{u.conv}.weight"], kept_count(sd[f"{u.conv}.weight"].shape[0],
                                                                      ratios[u.name])).tolist() for u in units}


def test_same_seed_same_weights_same_pruning(tiny_data, tmp_path):
    a = _train(tiny_data, tmp_path, "a", seed=7)
    b = _train(tiny_data, tmp_path, "b", seed=7)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{k} differs between two runs with the same seed"
    assert _decisions(a) == _decisions(b)
    pa, pb = pfec_prune(a, RATIOS), pfec_prune(b, RATIOS)
    assert pa.widths == pb.widths and pa.widths != a.widths
    assert all(torch.equal(x, y) for x, y in zip(pa.state_dict().values(), pb.state_dict().values()))
    # MWP too: the same global threshold, the same masks.
    m1, m2 = mwp_masks(a, 0.4), mwp_masks(b, 0.4)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)

    # Not vacuous: another seed (initialisation, order, augmentation) trains other weights and
    # prunes other filters.
    c = _train(tiny_data, tmp_path, "c", seed=8)
    assert not torch.equal(a.state_dict()["fc.weight"], c.state_dict()["fc.weight"])
    assert _decisions(a) != _decisions(c)


@pytest.mark.slow  # seconds: kept out of the fast part
def test_same_seed_same_weights_with_the_ffcv_loader(tiny_data, tmp_path):
    """FFCV, the default loader for real data (its JIT-compiled pipeline, one loader thread): two runs with
    the same seed train bitwise-equal weights and make the same pruning decisions."""
    a = _train(tiny_data, tmp_path, "ffcv_a", seed=7, backend="ffcv")
    b = _train(tiny_data, tmp_path, "ffcv_b", seed=7, backend="ffcv")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{k} differs between two FFCV runs with the same seed"
    assert _decisions(a) == _decisions(b)
