"""MODEL_CARD.md from a synthetic run: real checkpoints (so latency is measured), manifest and report."""

from __future__ import annotations

import os
import re

import torch

from kesi_dist.checkpoint import save_checkpoint
from kesi_dist.model_card import measure_latency, write_model_card
from kesi_dist.models import build_model
from kesi_dist.config import load_config
from kesi_dist.methods.kesi.report import build_report, layout
from kesi_dist.pruning import count_macs, count_nonzero_params, count_params, pfec_prune


def _entry(name: str, model, acc: float, **extra) -> dict:
    return {"name": name, "arch": model.arch, "widths": model.widths, "num_classes": model.num_classes,
            "params": count_params(model), "nonzero_params": count_nonzero_params(model),
            "macs": count_macs(model, (3, 16, 16)), "val_acc": acc, "checkpoint": f"snapshots/{name}.pt", **extra}


def test_model_card_sections_and_numbers(tmp_path):
    torch.manual_seed(0)
    base = build_model("resnet20", 4)
    small = pfec_prune(base, [0.5, 0.5, 0.5])
    for name, m in (("baseline", base), ("iter1_b0", small), ("iter1_fixed", small), ("student", small)):
        save_checkpoint(tmp_path / "snapshots" / f"{name}.pt", m)
    snaps = {"baseline": _entry("baseline", base, 0.9342, arm="baseline"),
             "iter1_b0": _entry("iter1_b0", small, 0.9231, arm="onecycle"),
             "iter1_fixed": _entry("iter1_fixed", small, 0.9035, arm="fixed"),
             "student": _entry("student", small, 0.9334, arm="student")}
    manifest = {"status": "complete", "snapshots": snaps, "stages": {
        "data": {"status": "complete", "path": "/data/digits", "num_classes": 4, "train_size": 1437, "val_size": 360},
        "prune_1": {"status": "complete", "chosen": "iter1_b0", "fixed": "iter1_fixed"},
        "ensemble": {"status": "complete", "teachers": ["baseline", "iter1_b0"], "acc": 0.9412}}}
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  arch: resnet20\ndata:\n  source: digits\n  resolution: 16\n  augment: cifar\n"
                      "method:\n  name: kesi\n  prune:\n    method: pfec\n    iterations: 1\n")
    report = build_report(manifest)

    path = write_model_card(tmp_path, manifest, report, layout(load_config(config)), config)
    assert path == tmp_path / "MODEL_CARD.md"
    card = path.read_text()
    assert card.startswith("# Model card: resnet20 pruned with PFEC x1 + KESI ensemble distillation\n")
    for section in ("## Size and measured speed (CPU)", "## Accuracy of every arm", "## Teachers", "## Data",
                    "## Reproduce", "## Export and load"):
        assert f"\n{section}\n" in card, section
    # Every arm's accuracy, in the paper's order.
    arms = ["| baseline | 93.42 %", "| pruned + fixed LR | 90.35 %", "| pruned + one-cycle | 92.31 %",
            "| ensemble of snapshots | 94.12 %", "| pruned + KESI (student) | 93.34 %"]
    assert [card.index(a) for a in arms] == sorted(card.index(a) for a in arms)
    # Size, MACs and measured latency (numbers, not placeholders) for baseline and student.
    p_b, p_s = snaps["baseline"]["params"], snaps["student"]["params"]
    lat = re.findall(r"^\| (baseline|student) \(`(\w+)`\) \| ([\d.]+) M \| [\d.]+ M \| ([\d.]+) M \| ([\d.]+) ms \| "
                     r"([\d.]+) ms \|$", card, re.M)
    assert [(r[0], r[1]) for r in lat] == [("baseline", "baseline"), ("student", "student")]
    assert float(lat[0][2]) == round(p_b / 1e6, 3) and float(lat[1][2]) == round(p_s / 1e6, 3)
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in lat)
    ratio = snaps["baseline"]["macs"] / snaps["student"]["macs"]
    assert f"{ratio:.2f}x fewer MACs" in card
    # The measured speed-up is the baseline's time over the student's, from the times in the table (as printed:
    # 2 decimals at batch 1, 1 at batch 64, so the ratio is checked within what that rounding allows).
    b1, b64 = re.search(r"measured speed-up ([\d.]+)x at batch 1 and ([\d.]+)x at batch 64", card).groups()
    for speed, col, half in ((float(b1), 4, 0.005), (float(b64), 5, 0.05)):
        tb, ts = float(lat[0][col]), float(lat[1][col])
        assert abs(speed - tb / ts) <= 0.005 + (tb + half) / (ts - half) - tb / ts, (speed, tb, ts)
    # Teachers, data, commands.
    assert "distilled from 2 teachers (ensemble top-1 94.12 %)" in card
    assert "- `baseline`: top-1 93.42 %" in card and "- `iter1_b0`: top-1 92.31 %" in card
    assert "- 1437 training images / 360 test images, 4 classes" in card and "16x16 px" in card
    assert "kesi run config.yaml --output NEW_RUN_DIR" in card and "  arch: resnet20" in card  # config embedded
    for fmt, out in (("onnx", "student.onnx"), ("torchscript", "student.ts"), ("safetensors", "student.safetensors")):
        assert f"kesi export . --format {fmt} --out {out}" in card
    assert str(tmp_path) not in card  # no absolute path: the card stays true when the folder moves
    assert f"torch {torch.__version__.split('+')[0]}" in card and "## Software" in card
    assert 'ort.InferenceSession("student.onnx").run(None, {"input": x})[0]' in card
    assert 'torch.jit.load("student.ts")' in card and "build_model(spec[\"arch\"]" in card


def test_measure_latency_is_per_batch_size():
    lat = measure_latency(build_model("resnet20", 4), 16, batches=(1, 8), repeats=2)
    assert set(lat) == {1, 8} and all(v > 0 for v in lat.values())


def test_the_cards_loading_snippet_normalises_as_the_run_did(tmp_path):
    """The card's preprocessing lines, run on a test image saved as PNG, give the tensor the run's own
    val loader gives for that image (mean/std on the 0-255 scale from meta.json, RGB, NCHW)."""
    import numpy as np
    from PIL import Image

    from kesi_dist.data import make_loader, prepare_dataset
    from kesi_dist.data.beton import BetonFile
    from kesi_dist.model_card import _normalisation, _preprocessing

    data = tmp_path / "data"
    prepare_dataset("synthetic", None, data, resolution=16, seed=0, workers=1, num_train=40, num_val=8,
                    num_classes=4)
    norm = _normalisation({"stages": {"data": {"path": str(data)}}})
    assert len(norm["mean"]) == 3 and len(norm["class_names"]) == 4
    Image.fromarray(BetonFile(data / "val.beton").image(0)).save(tmp_path / "image.png")
    scope: dict = {}
    code = "\n".join(["import numpy as np", "from PIL import Image", *_preprocessing(norm, 16)])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "MODEL_CARD.md", "exec"), scope)  # the card's own text, written by kesi_dist
    finally:
        os.chdir(cwd)
    val = make_loader(data, "val", batch_size=8, resolution=16, augment="cifar", backend="torch", num_workers=0)
    expected = next(iter(val))[0][0].numpy()
    assert scope["x"].shape == (1, 3, 16, 16) and np.allclose(scope["x"][0], expected, atol=1e-4)
