"""Export of pruned models (PFEC and MWP) to onnx / torchscript / safetensors, verified, and reloaded
in a fresh Python process that never imports kesi_dist; `kesi export` on a run directory. No Ray."""

from __future__ import annotations

import copy

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.cli import main as kesi
from kesi_dist.errors import RunError
from kesi_dist.export import FORMATS, export_model, export_snapshot, widths_path
from kesi_dist.models import build_model
from kesi_dist.pruning import apply_masks, mwp_masks, pfec_prune

RES = 16


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics (a fresh BN is the identity in eval mode, which would hide mistakes)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, RES, RES) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    base = _trained_looking(build_model("resnet20", 4))
    pfec = pfec_prune(base, [0.3, 0.3, 0.3])
    mwp = copy.deepcopy(base)
    masks = mwp_masks(mwp, 0.5)
    apply_masks(mwp, masks)
    save_checkpoint(d / "pfec.pt", pfec)
    save_checkpoint(d / "mwp.pt", mwp, masks)
    return {"pfec": d / "pfec.pt", "mwp": d / "mwp.pt"}


RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, torch
    from safetensors.torch import load_file
    d, x = sys.argv[1], np.load(sys.argv[2])
    out = {}
    for kind in ("pfec", "mwp"):
        out[kind + "_onnx"] = ort.InferenceSession(f"{d}/{kind}.onnx").run(None, {"input": x})[0]
        with torch.no_grad():
            out[kind + "_ts"] = torch.jit.load(f"{d}/{kind}.ts")(torch.from_numpy(x)).numpy()
        for k, v in load_file(f"{d}/{kind}.safetensors").items():
            out[kind + "_st/" + k] = v.numpy()
        out[kind + "_spec"] = np.array(json.dumps(json.load(open(f"{d}/{kind}.safetensors.widths.json"))))
    assert "kesi_dist" not in sys.modules, "the artefacts must load without kesi_dist"
    np.savez(f"{d}/reloaded.npz", **out)
""")


@pytest.mark.slow  # ~10 s quiet, 30 s on a loaded 2-core machine: a fresh interpreter imports torch + onnxruntime
def test_every_format_reloads_without_kesi_dist(checkpoints, tmp_path):
    sample = torch.randn(4, 3, RES, RES)
    ext = {"onnx": "onnx", "torchscript": "ts", "safetensors": "safetensors"}
    for kind, ckpt in checkpoints.items():
        for fmt in FORMATS:
            info = export_snapshot(ckpt, fmt, tmp_path / f"{kind}.{ext[fmt]}", sample=sample)
            assert info["format"] == fmt and info["max_abs_diff"] <= 1e-4 and info["verified_batch"] == 4
            assert info["params"] > 0 and info["macs"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    x = np.random.default_rng(1).standard_normal((3, 3, RES, RES)).astype(np.float32)  # another batch size
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "reloaded.npz")
    for kind, ckpt in checkpoints.items():
        ck = load_checkpoint(ckpt)
        model, masks = model_from_checkpoint(ck)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(got[f"{kind}_onnx"] - ref).max() <= 1e-4
        assert np.abs(got[f"{kind}_ts"] - ref).max() <= 1e-4
        state = model.state_dict()
        assert {k.split("/", 1)[1] for k in got.files if k.startswith(f"{kind}_st/")} == set(state)
        for k, v in state.items():
            assert np.array_equal(got[f"{kind}_st/{k}"], v.numpy()), k
        spec = json.loads(str(got[f"{kind}_spec"]))
        assert (spec["arch"], spec["widths"], spec["num_classes"]) == (ck["arch"], ck["widths"], 4)
        rebuilt = build_model(spec["arch"], spec["num_classes"], spec["widths"])  # the documented recipe
        rebuilt.load_state_dict({k: torch.from_numpy(got[f"{kind}_st/{k}"]) for k in state})
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(torch.from_numpy(x)), torch.from_numpy(ref))
    # PFEC is physically smaller; MWP's masked weights are exactly zero in the exported tensors.
    pfec_spec = json.loads(str(got["pfec_spec"]))
    assert pfec_spec["widths"][0] == 11 < 16
    masks = load_checkpoint(checkpoints["mwp"])["masks"]
    for k, m in masks.items():
        w = got[f"mwp_st/{k}"]
        assert (w[m.numpy() == 0] == 0).all() and (m == 0).any(), k


def test_verification_failure_writes_nothing(checkpoints, tmp_path):
    model, _ = model_from_checkpoint(load_checkpoint(checkpoints["pfec"]))
    forward, calls = model.forward, [0]

    def drifting(x):  # a model whose output changes from call to call cannot be exported faithfully
        calls[0] += 1
        return forward(x) + calls[0]

    model.forward = drifting
    for fmt in FORMATS:
        out = tmp_path / f"bad.{fmt}"
        with pytest.raises(RunError, match=r"verification failed: max \|diff\| = .* exceeds atol 0.0001; nothing"):
            export_model(model, fmt, out, sample=torch.randn(2, 3, RES, RES))
        assert not out.exists() and not widths_path(out).exists()
    assert list(tmp_path.iterdir()) == []


# -- kesi export on a run directory ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_data, checkpoints):
    """What `kesi run` leaves behind, minus the training: manifest, config.yaml, snapshots, data."""
    run = tmp_path_factory.mktemp("run")
    (run / "snapshots").mkdir()
    (run / "snapshots" / "student.pt").write_bytes(checkpoints["pfec"].read_bytes())
    (run / "snapshots" / "iter1_b0.pt").write_bytes(checkpoints["mwp"].read_bytes())
    (run / "config.yaml").write_text(f"data:\n  source: synthetic\n  resolution: {RES}\n  batch_size: 8\n  augment: cifar\n")
    entry = {"checkpoint": "snapshots/student.pt", "val_acc": 0.9}
    (run / "manifest.json").write_text(json.dumps({
        "format": "kesi_dist/manifest/v1", "status": "complete",
        "stages": {"data": {"status": "complete", "path": tiny_data}},
        "snapshots": {"iter1_init": {"checkpoint": "snapshots/iter1_init.pt"},
                      "iter1_b0": {"checkpoint": "snapshots/iter1_b0.pt"}, "student": entry}}))
    return run


def test_cli_export_verifies_on_validation_images(fake_run, tmp_path, capsys):
    import onnxruntime as ort

    assert kesi(["export", str(fake_run), "--format", "onnx", "--out", str(tmp_path / "s.onnx")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"onnx: {tmp_path / 's.onnx'}  (student: ")
    assert "M MACs)  verified on 8 validation images: max |diff| = " in line and "\n" not in line
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"))
    assert sess.run(None, {"input": np.zeros((5, 3, RES, RES), np.float32)})[0].shape == (5, 4)
    assert kesi(["export", str(fake_run), "--snapshot", "iter1_b0", "--format", "safetensors",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "+ " + str(tmp_path / "m.safetensors.widths.json") in capsys.readouterr().out


def test_cli_export_without_data_uses_random_inputs(fake_run, tmp_path, capsys):
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("config.yaml", "snapshots"):
        (moved / name).symlink_to(fake_run / name)
    m = json.loads((fake_run / "manifest.json").read_text())
    m["stages"]["data"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(m))
    assert kesi(["export", str(moved), "--format", "torchscript", "--out", str(tmp_path / "s.ts")]) == 0
    assert f"random inputs: the run's data folder {tmp_path / 'gone'} is gone" in capsys.readouterr().out
    assert torch.jit.load(str(tmp_path / "s.ts"))(torch.zeros(2, 3, RES, RES)).shape == (2, 4)


def test_cli_export_errors(fake_run, tmp_path, capsys):
    cases = [
        (["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "a.onnx")],
         f"error: {tmp_path}: not a kesi_dist run directory (no manifest.json); pass the --output folder of `kesi run`"),
        (["export", str(fake_run), "--snapshot", "iter9_b0", "--format", "onnx", "--out", str(tmp_path / "a.onnx")],
         f"error: --snapshot iter9_b0: not in {fake_run / 'manifest.json'}; available: iter1_b0, student"),
        (["export", str(fake_run), "--format", "onnx", "--out", str(tmp_path)],
         f"error: --out {tmp_path}: is a folder; give a file path such as {tmp_path / 'model.onnx'}"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((["export", str(fake_run), "--format", "onnx", "--out", str(tmp_path / "file" / "a.onnx")],
                  f"error: --out {tmp_path / 'file' / 'a.onnx'}: cannot create folder {tmp_path / 'file'} "))
    for argv, expected in cases:
        assert kesi(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err
    # A run without a distilled student: the default names what is there.
    no_student = tmp_path / "nostudent"
    no_student.mkdir()
    m = json.loads((fake_run / "manifest.json").read_text())
    del m["snapshots"]["student"]
    (no_student / "manifest.json").write_text(json.dumps(m))
    assert kesi(["export", str(no_student), "--format", "onnx", "--out", str(tmp_path / "b.onnx")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --snapshot student: not in {no_student / 'manifest.json'} (the run has no distilled student: "
        "distillation was off or did not finish); available: iter1_b0")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_cli_export_never_writes_into_the_run_but_beside_its_files(fake_run, tmp_path, capsys):
    """A new file at the run's root is fine (MODEL_CARD.md: `kesi export . --out student.onnx`); a run
    file or anything under a run subfolder is refused and left as it was (more in test_bad_input)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    before = (run / "snapshots" / "student.pt").read_bytes()
    for out in (run / "snapshots" / "student.pt", run / "manifest.json", run / "snapshots" / "new.onnx"):
        assert kesi(["export", str(run), "--format", "onnx", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out}: is a ") and "never writes" in err[0], err
    assert (run / "snapshots" / "student.pt").read_bytes() == before and not (run / "snapshots" / "new.onnx").exists()
    assert kesi(["export", str(run), "--format", "onnx", "--out", str(run / "student.onnx")]) == 0
    assert (run / "student.onnx").is_file()
