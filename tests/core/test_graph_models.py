"""Networks from torchvision and timm as prunable models (issue 26): the dependency graph's units agree with
the zoo's where both apply, cutting a unit equals zeroing its channels at their producers, a cut network
rebuilds bitwise in a fresh process, MACs count right, exports match, and weights files are checked."""

import builtins
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from kesi_dist.checkpoint import load_tensors, save_checkpoint
from kesi_dist.config import parse_config
from kesi_dist.errors import UsageError
from kesi_dist.export import export_model
from kesi_dist.models import build_model, default_widths, model_options, model_units
from kesi_dist.models.graph import trace
from kesi_dist.models.graphnet import check_prunable
from kesi_dist.models.sources import source_problem
from kesi_dist.models.weights import load_source_weights
from kesi_dist.pruning import count_macs, count_params, kept_count, l1_keep_indices, macs_function, pfec_prune, slice_units

ROOT = Path(__file__).resolve().parents[2]
RES = 32
ARCHS = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "timm:mobilenetv3_small_050"]
KINDS = {"torchvision:resnet18": {"inner", "stream"}, "torchvision:resnet50": {"inner", "stream"},
         "torchvision:mobilenet_v2": {"inner", "stream", "depthwise"},
         "timm:mobilenetv3_small_050": {"inner", "stream", "depthwise"}}


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that no norm is the identity (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _zeroed(model: nn.Module, unit, drop: list[int]) -> nn.Module:
    """A copy of `model` whose unit channels `drop` are zero at every producer (conv filters, biases, norms)."""
    z = copy.deepcopy(model)
    modules = dict(z.named_modules())
    with torch.no_grad():
        for path in (unit.conv, *unit.producers, *unit.norms):
            m = modules[path]
            m.weight[drop] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[drop] = 0
    return z


# -- the zoo as reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch, ratios", [("resnet18", [0.3, 0.5, 0.4, 0.2]), ("resnet56", [0.1, 0.2, 0.3])])
def test_graph_inner_units_are_the_zoos_and_a_pfec_chain_agrees(arch, ratios):
    torch.manual_seed(0)
    zoo = _trained_like(build_model(arch, 10))
    fields = lambda u: (u.name, u.stage, u.conv, u.norms, u.consumers)  # noqa: E731
    inner = [u for u in trace(zoo, RES, ("fc",), arch).units if u.kind == "inner"]
    assert [fields(u) for u in inner] == [fields(u) for u in zoo.units()]

    by_zoo, by_graph = zoo, copy.deepcopy(zoo)
    x = torch.randn(2, 3, RES, RES)
    for _ in range(2):  # a PFEC chain: each iteration prunes the current widths
        by_zoo = pfec_prune(by_zoo, ratios)
        graph = trace(by_graph, RES, ("fc",), arch)
        convs = dict(by_graph.named_modules())
        for u in graph.units:
            if u.kind == "inner":
                w = convs[u.conv].weight
                graph.cut(u.name, l1_keep_indices(w, kept_count(w.shape[0], ratios[u.stage])).tolist())
        assert [convs[u.conv].out_channels for u in inner] == by_zoo.widths
        assert count_params(by_graph) == count_params(by_zoo)
        assert count_macs(by_graph, (3, RES, RES)) == count_macs(by_zoo, (3, RES, RES))
        with torch.no_grad():
            assert torch.equal(by_graph(x), by_zoo(x))


# -- torchvision / timm networks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cut_nets():
    """Per network: (model, x, {kind: (max |cut - zeroed|, max |zeroed|)}, a net cut in one unit of every
    kind, its logits)."""
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = _trained_like(build_model(arch, 5, resolution=RES))
        x = torch.randn(2, 3, RES, RES)
        units, diffs, keep = model.units(), {}, {}
        for kind in sorted({u.kind for u in units}):
            of_kind = [u for u in units if u.kind == kind]
            u = of_kind[len(of_kind) // 2]
            c = model.widths[units.index(u)]
            kept = torch.randperm(c, generator=torch.Generator().manual_seed(1))[: c // 2].sort().values
            keep[u.name] = kept
            cut = slice_units(model, {u.name: kept})
            with torch.no_grad():
                a, b = cut(x), _zeroed(model, u, sorted(set(range(c)) - set(kept.tolist())))(x)
            diffs[kind] = (float((a - b).abs().max()), float(b.abs().max()))
        both = slice_units(model, keep)
        with torch.no_grad():
            out[arch] = (model, x, diffs, both, both(x))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_cutting_a_unit_equals_zeroing_it_at_its_producers(cut_nets, arch):
    model, x, diffs, both, logits = cut_nets[arch]
    assert set(diffs) == KINDS[arch]
    for kind, (diff, scale) in diffs.items():
        assert scale > 0.1 and diff <= 1e-5 * max(1.0, scale), (kind, diff, scale)
    assert both.widths != model.widths and both.arch == arch and both.options == {"resolution": RES}
    # the graph's MACs formula prices a cut width vector exactly, depthwise convs linearly
    assert macs_function(model, (3, RES, RES))(both.widths) == count_macs(both, (3, RES, RES))
    rebuilt = build_model(arch, 5, both.widths, resolution=RES)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in both.state_dict().items()}


@pytest.mark.slow  # seconds: kept out of the fast part
def test_a_cut_checkpoint_rebuilds_bitwise_in_a_fresh_process(cut_nets, tmp_path):
    jobs = []
    for i, arch in enumerate(ARCHS):
        _, x, _, both, logits = cut_nets[arch]
        save_checkpoint(tmp_path / f"{i}.pt", both)
        torch.save({"x": x}, tmp_path / f"{i}.x.pt")
        jobs.append(str(tmp_path / str(i)))
    child = ("import sys, torch; from kesi_dist.checkpoint import load_checkpoint, load_tensors, model_from_checkpoint\n"
             "torch.set_num_threads(int(sys.argv[1]))\n"
             "for job in sys.argv[2:]:\n"
             "    model, _ = model_from_checkpoint(load_checkpoint(job + '.pt'))\n"
             "    with torch.no_grad():\n"
             "        torch.save({'logits': model(load_tensors(job + '.x.pt')['x'])}, job + '.out.pt')\n")
    subprocess.run([sys.executable, "-c", child, str(torch.get_num_threads()), *jobs], check=True, cwd=ROOT)
    for arch, job in zip(ARCHS, jobs):
        assert torch.equal(load_tensors(job + ".out.pt")["logits"], cut_nets[arch][4]), arch


def test_a_pruned_graph_net_exports_with_matching_logits(cut_nets, tmp_path):
    _, x, _, both, logits = cut_nets["torchvision:mobilenet_v2"]
    for fmt in ("onnx", "torchscript", "safetensors"):
        info = export_model(both, fmt, tmp_path / f"m.{fmt}", sample=x)
        assert info["max_abs_diff"] <= 1e-4 and info["widths"] == both.widths
    side = json.loads((tmp_path / "m.safetensors.widths.json").read_text())
    m = build_model(side["arch"], side["num_classes"], side["widths"], **side["options"])
    m.load_state_dict(load_file(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), logits)


def test_registry_pfec_and_the_units_of_a_graph_net():
    arch = "torchvision:resnet18"
    assert model_options(arch) == ("resolution",)
    units = model_units(arch)
    assert [u.name for u in units[:5]] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.0.conv2"]
    assert [u.kind for u in units[:5]] == ["stream", "inner", "inner", "inner", "stream"]
    assert [u.stage for u in units] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert default_widths(arch) == [64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512]
    torch.manual_seed(0)
    model = build_model(arch, 3, resolution=RES)
    streams = [u.name for u in units if u.kind == "stream"]
    small = pfec_prune(model, [0.5] * 4, skip=streams)
    assert small.widths == [64, 32, 32, 64, 128, 64, 128, 256, 128, 256, 512, 256]
    with pytest.raises(UsageError, match="widths must be a list of 12 positive ints"):
        build_model(arch, 3, [8] * 3, resolution=RES)
    with pytest.raises(UsageError, match="unit conv1 has 64 channels, got width 65"):
        build_model(arch, 3, [65] + default_widths(arch)[1:], resolution=RES)
    with pytest.raises(UsageError, match="has no option 'shortcut'"):
        build_model(arch, 3, shortcut="slice")


def test_parameters_outside_layers_are_cut_and_rebuilt():
    """timm's ConvNeXt scales each block's channels by a parameter of the block itself (layer scale), which
    the graph finds and cuts with its stream; the cut network rebuilds from its widths exactly."""
    arch = "timm:test_convnext"
    torch.manual_seed(0)
    model = build_model(arch, 3, resolution=RES).eval()
    units = model.units()
    u = [u for u in units if u.kind == "stream"][-1]
    c = model.widths[units.index(u)]
    cut = slice_units(model, {u.name: list(range(0, c, 2))})
    gamma = "net.stages.3.blocks.1.gamma"
    assert torch.equal(cut.state_dict()[gamma], model.state_dict()[gamma][::2])
    rebuilt = build_model(arch, 3, cut.widths, resolution=RES)
    rebuilt.load_state_dict(cut.state_dict())
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), cut(x))


# -- what the graph refuses -----------------------------------------------------------------------------

def test_networks_the_graph_cannot_cut_are_refused_naming_the_layer(monkeypatch):
    with pytest.raises(UsageError, match=r"^torchvision:resnext50_32x4d: cannot prune it: layer1\.0\.conv2: "
                                         r"grouped convolution \(groups=32\) is not supported$"):
        check_prunable("torchvision:resnext50_32x4d", RES)
    with pytest.raises(UsageError, match=r"^timm:test_vit: cannot prune it: blocks\.0\.attn: fails once unit "
                                         r"blocks\.0\.attn is cut \(RuntimeError: .*\): the graph misses a coupling"):
        check_prunable("timm:test_vit", 224)
    check_prunable("torchvision:resnet18", RES)  # the networks the tests above cut pass
    assert "did you mean resnet18" in source_problem("torchvision:resnet1800")
    assert "timm has no model 'resnet_9000'" in source_problem("timm:resnet_9000")
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as when the extra is missing
    source_problem.cache_clear()
    try:
        with pytest.raises(UsageError, match=r"timm networks need the timm extra: pip install 'kesi_dist\[timm\]'"):
            build_model("timm:resnet18", 10)
    finally:
        source_problem.cache_clear()


def test_the_config_takes_a_graph_network_and_refuses_what_it_cannot_cut():
    ratios = {"method": {"prune": {"stage_ratios": [0.1, 0.2, 0.3, 0.3]}}}
    cfg = parse_config({"model": {"arch": "torchvision:resnet18", "weights": "s3://bucket/mine.pth"},
                        "data": {"resolution": RES}, "baseline": {"epochs": 0}, **ratios})
    assert cfg.model.options() == {"resolution": RES}  # traced at the data's resolution unless model.resolution
    assert parse_config({"model": {"arch": "torchvision:resnet18", "resolution": 64}, **ratios}).model.resolution == 64
    for raw, error in [
        ({"model": {"arch": "torchvision:resnext50_32x4d"}},
         "x.yaml: model.arch: torchvision:resnext50_32x4d: cannot prune it: layer1.0.conv2: grouped convolution "
         "(groups=32) is not supported"),
        ({"model": {"arch": "torchvision:resnet1800"}}, "x.yaml: model.arch: torchvision:resnet1800: torchvision has "
         "no classification model 'resnet1800'; did you mean resnet18"),
        ({"model": {"arch": "resnet56", "resolution": 64}}, "model.resolution applies to torchvision:/timm: networks"),
        ({"baseline": {"epochs": 0}}, "baseline.epochs: 0 means the given weights are the baseline; set model.weights"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_config(raw, "x.yaml")
        assert error in str(e.value) and "\n" not in str(e.value)


# -- trained weights from the user's file -------------------------------------------------------------

class _Evil:
    """Pickles into a call of `open(marker, "w")`: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_weights_files_load_exactly_and_wrong_ones_are_refused(tmp_path):
    torch.manual_seed(3)
    source = _trained_like(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        expected = source(x)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pt")
    for name in ("r18.pth", "r18.safetensors", "ddp.pt"):
        model = build_model("torchvision:resnet18", 10, resolution=RES)
        report = load_source_weights(model, tmp_path / name)
        assert not report.head_replaced and report.tensors == len(source.state_dict())
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected), name

    other = build_model("torchvision:resnet18", 4, resolution=RES)  # the user's data has 4 classes
    report = load_source_weights(other, tmp_path / "r18.pth")
    assert report.head_replaced and report.file_classes == 10 and "a new head is trained" in report.message
    assert torch.equal(other.net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    zoo = build_model("resnet20", 10)  # a zoo network's own state dict, for other classes
    torch.save(zoo.state_dict(), tmp_path / "r20.pth")
    assert load_source_weights(build_model("resnet20", 4), tmp_path / "r20.pth").head_replaced

    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UsageError, match=r"r34\.pth: does not fit torchvision:resnet18: the network has no "
                                         r"'layer1\.2\.conv1\.weight' \(first mismatching key\)$"):
        load_source_weights(build_model("torchvision:resnet18", 10, resolution=RES), tmp_path / "r34.pth")
    with pytest.raises(UsageError, match=r"does not fit torchvision:mobilenet_v2: the file has no "
                                         r"'features\.0\.0\.weight'"):
        load_source_weights(build_model("torchvision:mobilenet_v2", 10, resolution=RES), tmp_path / "r18.pth")

    marker = tmp_path / "pwned"
    torch.save({"state_dict": source.state_dict(), "evil": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UsageError, match=r"evil\.pth: refused to load: it holds more than tensors .*GLOBAL io\.open"):
        load_source_weights(build_model("torchvision:resnet18", 10, resolution=RES), tmp_path / "evil.pth")
    assert not marker.exists()
