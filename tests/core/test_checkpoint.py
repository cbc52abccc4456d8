"""Checkpoints: round trip in a fresh process, masks re-applied, unsafe or foreign files refused."""

import builtins
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from kesi_dist.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.errors import RunError
from kesi_dist.models import build_model
from kesi_dist.pruning import apply_masks, mwp_masks, pfec_prune


@pytest.fixture
def pruned(tmp_path):
    """A PFEC-pruned, then MWP-masked ResNet-20 (5 classes) saved to tmp_path/model.pt."""
    torch.manual_seed(0)
    model = pfec_prune(build_model("resnet20", 5), [0.3, 0.4, 0.5], skip=["layer2.0"])
    masks = mwp_masks(model, 0.5)
    apply_masks(model, masks)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, masks, metrics={"val_acc": 0.5}, extra={"iteration": 2, "parent": "prune_1"})
    return model.eval(), masks, path


def test_round_trip_and_format(pruned, tmp_path):
    model, masks, path = pruned
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["arch"] == "resnet20" and ckpt["num_classes"] == 5
    assert ckpt["widths"] == model.widths and ckpt["metrics"] == {"val_acc": 0.5}
    assert ckpt["iteration"] == 2 and ckpt["parent"] == "prune_1"
    rebuilt, rmasks = model_from_checkpoint(ckpt)
    assert set(rmasks) == set(masks) and not rebuilt.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="overwrite"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"widths": [1]})


def test_masks_are_reapplied_on_load(pruned, tmp_path):
    model, masks, _ = pruned
    with torch.no_grad():  # weights drifted away from zero (e.g. saved mid-step): loading re-masks them
        for name, p in model.named_parameters():
            if name in masks:
                p.add_(1.0)
    save_checkpoint(tmp_path / "drift.pt", model, masks)
    rebuilt, _ = model_from_checkpoint(load_checkpoint(tmp_path / "drift.pt"))
    params = dict(rebuilt.named_parameters())
    assert all((params[k][m == 0] == 0).all() for k, m in masks.items())


def test_loads_in_a_fresh_process_without_pruning_history(pruned, tmp_path):
    model, _, path = pruned
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
        model, masks = model_from_checkpoint(load_checkpoint({str(path)!r}))
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(io["x"])
        assert torch.allclose(out, io["y"], rtol=1e-5, atol=1e-6), (out - io["y"]).abs().max()
        print("OK", model.arch, model.widths[3], sum(int((m == 0).sum()) for m in masks.values()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    n_masked = sum(int((m == 0).sum()) for m in pruned[1].values())
    assert res.stdout.split() == ["OK", "resnet20", str(model.widths[3]), str(n_masked)]


class _Evil:
    """Pickles into a call of `open(marker, "w")`: loading it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"format": FORMAT, "arch": "resnet20", "evil": _Evil(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch's legacy format: gets as far as the GLOBAL
    assert not marker.exists()
    with pytest.raises(RunError, match=r"evil\.pt: refused to load.*unsupported global: GLOBAL io\.open"):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_truncated_and_mismatched_files_are_refused(pruned, tmp_path):
    model, _, path = pruned
    with pytest.raises(RunError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")

    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(RunError, match=r"plain\.pt: not a kesi_dist checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(RunError, match=r"tensor\.pt: not a kesi_dist checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")

    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"cut\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("arch: resnet20\n")
    with pytest.raises(RunError, match=r"text\.pt: "):
        load_checkpoint(tmp_path / "text.pt")

    ckpt = torch.load(path, weights_only=True)
    ckpt["widths"] = [16] * 9  # the stored weights are the pruned ones: they no longer fit
    torch.save(ckpt, tmp_path / "widths.pt")
    with pytest.raises(RunError, match=r"widths\.pt: state_dict does not match resnet20"):
        load_checkpoint(tmp_path / "widths.pt")
    ckpt["arch"] = "resnet99"
    torch.save(ckpt, tmp_path / "arch.pt")
    with pytest.raises(RunError, match=r"arch\.pt: unknown model 'resnet99'"):
        load_checkpoint(tmp_path / "arch.pt")


def test_save_is_atomic_on_failure(pruned, tmp_path, monkeypatch):
    model, _, path = pruned
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RunError, match=r"model\.pt: cannot write it: disk full; nothing was replaced"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.pt"]
