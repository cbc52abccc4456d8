"""The model zoo: every registered model builds, runs, rebuilds from its widths and prunes (timm-style)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kesi_dist.errors import UsageError
from kesi_dist.models import MODELS, build_model, default_widths, model_units
from kesi_dist.pruning import count_params, pfec_prune

ARCHS = sorted(MODELS)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _stages(arch):
    return max(u.stage for u in model_units(arch)) + 1


def test_registry_has_the_papers_models():
    assert set(ARCHS) == {
        "resnet20", "resnet32", "resnet56", "resnet110", "preresnet164", "wrn16_8", "vgg16", "resnet18", "resnet34",
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_model_builds_runs_rebuilds_and_prunes(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7)
    assert (model.arch, model.num_classes) == (arch, 7)
    assert json.loads(json.dumps(model.widths)) == model.widths == default_widths(arch)

    # Every unit's width is its conv's filter count, in units() order.
    modules = dict(model.named_modules())
    units = model.units()
    assert len(units) == len(model.widths) == len({u.name for u in units})
    assert [modules[u.conv].out_channels for u in units] == model.widths

    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)

    rebuilt = build_model(model.arch, model.num_classes, model.widths)
    assert _shapes(rebuilt) == _shapes(model)
    rebuilt.load_state_dict(model.state_dict())

    small = pfec_prune(model, [0.5] * _stages(arch))
    assert count_params(small) < count_params(model)
    assert all(w < w0 for w, w0 in zip(small.widths, model.widths))
    assert _shapes(build_model(arch, 7, small.widths)) == _shapes(small)
    with torch.no_grad():
        out = small(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


# Unpruned CIFAR-10 parameter counts as reported by the paper (M, 2 decimals).
PAPER_PARAMS = {"resnet56": 0.85, "resnet110": 1.73, "preresnet164": 1.70, "wrn16_8": 10.96, "vgg16": 14.99}


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_unpruned_param_counts_match_the_paper(arch):
    assert round(count_params(build_model(arch, 10)) / 1e6, 2) == PAPER_PARAMS[arch]


def test_imagenet_resnets_any_size_and_class_count():
    model = build_model("resnet18", num_classes=200).eval()
    # torchvision's ResNet-18 has 11.69 M params with 1000 classes; the fc shrinks by 800 x 513.
    assert count_params(build_model("resnet18", 1000)) == 11_689_512
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)
        assert model(torch.randn(1, 3, 97, 80)).shape == (1, 200)


def test_unit_names_and_stages():
    r56 = [u.name for u in model_units("resnet56")]
    assert r56[7] == "layer1.7" and r56[9] == "layer2.0" and r56[-1] == "layer3.8" and len(r56) == 27
    pre = model_units("preresnet164")
    assert [u.name for u in pre[34:36]] == ["layer1.17.conv1", "layer1.17.conv2"]
    assert {u.stage for u in pre} == {0, 1, 2} and len(pre) == 108
    vgg = model_units("vgg16")
    assert [u.name for u in vgg][:3] == ["conv1_1", "conv1_2", "conv2_1"] and vgg[-1].name == "conv5_3"
    assert [u.stage for u in vgg] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert vgg[-1].consumers == ("classifier.0",)
    assert [u.name for u in model_units("wrn16_8")] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1)]
    assert {u.stage for u in model_units("resnet34")} == {0, 1, 2, 3}


def test_option_a_shortcut_has_no_parameters():
    """The reference's 2x2 average (the default) and the strided slice, both + zero channels."""
    x = torch.randn(1, 16, 8, 8)
    for shortcut, expect in (("avgpool", torch.nn.functional.avg_pool2d(x, 2)), ("slice", x[:, :, ::2, ::2])):
        model = build_model("resnet20", shortcut=shortcut) if shortcut != "avgpool" else build_model("resnet20")
        assert not any("shortcut" in k for k in model.state_dict()) and model.options == {"shortcut": shortcut}
        sc = model.layer2[0].shortcut(x)
        assert sc.shape == (1, 32, 4, 4)
        assert torch.allclose(sc[:, :16], expect) and not sc[:, 16:].any()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UsageError, match="vgg16: has no option 'shortcut'"):
        build_model("vgg16", shortcut="slice")
    with pytest.raises(UsageError, match="shortcut 'conv'"):
        build_model("resnet20", shortcut="conv")


def test_both_shortcuts_survive_pruning_surgery_checkpoints_and_export(tmp_path):
    """PFEC surgery keeps the shortcut; a checkpoint stores it; one from before the option (no
    "options" key) loads as the slicing kind it was; ONNX export of the pruned net matches PyTorch."""
    import onnxruntime as ort

    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from kesi_dist.export import export_model
    from kesi_dist.pruning import pfec_prune

    x = torch.randn(3, 3, 16, 16)
    for shortcut in ("avgpool", "slice"):
        model = build_model("resnet20", 4, shortcut=shortcut).eval()
        pruned = pfec_prune(model, [0.25, 0.5, 0.5]).eval()
        assert pruned.options == {"shortcut": shortcut} and pruned.widths != model.widths
        path = tmp_path / f"{shortcut}.pt"
        save_checkpoint(path, pruned)
        again, _ = model_from_checkpoint(load_checkpoint(path))
        assert again.options == {"shortcut": shortcut} and torch.allclose(again(x), pruned(x), atol=1e-6)
        onnx = tmp_path / f"{shortcut}.onnx"
        export_model(pruned, "onnx", onnx, sample=x)  # verified against PyTorch by the export itself
        got = ort.InferenceSession(str(onnx)).run(None, {"input": x.numpy()})[0]
        assert np.allclose(got, pruned(x).detach().numpy(), atol=1e-4)
        info = export_model(pruned, "safetensors", tmp_path / f"{shortcut}.safetensors", sample=x)  # rebuilt with options
        assert json.loads(Path(info["widths_file"]).read_text())["options"] == {"shortcut": shortcut}
    legacy = torch.load(tmp_path / "slice.pt", weights_only=True)
    del legacy["options"]  # as written before the option existed
    torch.save(legacy, tmp_path / "legacy.pt")
    old, _ = model_from_checkpoint(load_checkpoint(tmp_path / "legacy.pt"))
    assert old.options == {"shortcut": "slice"}


def test_bad_arch_and_widths_are_usage_errors():
    with pytest.raises(UsageError, match="unknown model 'resnet57'.*resnet56"):
        build_model("resnet57")
    with pytest.raises(UsageError, match="resnet20: widths must be a list of 9 positive ints"):
        build_model("resnet20", 10, [16] * 8)
    with pytest.raises(UsageError, match="widths"):
        build_model("resnet20", 10, [16] * 8 + [0])
    with pytest.raises(UsageError, match="num_classes"):
        build_model("resnet20", 0)
