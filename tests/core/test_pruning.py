"""Counting (cross-checked with ptflops), PFEC filter pruning, surgery and MWP masks through real optimizer steps."""

import copy

import pytest
import torch
from torch import nn

from kesi_dist.errors import BadValue
from kesi_dist.models import build_model
from kesi_dist.pruning import (
    MaskConstraint, apply_masks, conv_weights, count_macs, count_nonzero_params, count_params, kept_count,
    mask_gradients, mwp_masks, pfec_prune, slice_units, sparsity, sparsity_target,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine params, and running stats measured on random data (then eval mode).

    Measured stats keep activations O(1) through deep nets, so outputs compare at 1e-5 absolute.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------------------ counting
def test_count_macs_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )
    # conv1: 8*8*8 outputs x 3*9; grouped conv2: 8*4*4 outputs x (8/4)*9; linear 128 x 5.
    assert count_macs(model, (3, 8, 8)) == 512 * 27 + 128 * 18 + 128 * 5
    assert model.training  # mode restored
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_nonzero_params(model) == count_params(model) - 8  # fresh BN biases are zero
    with torch.no_grad():
        model[0].weight[:2] = 0
    assert count_nonzero_params(model) == count_params(model) - 8 - 2 * 27


@pytest.mark.parametrize("arch,res", [("resnet20", 32), ("preresnet164", 32), ("wrn16_8", 32), ("vgg16", 32),
                                      ("resnet18", 64)])
def test_count_macs_agrees_with_ptflops(arch, res):
    from ptflops import get_model_complexity_info

    model = build_model(arch, 10)
    models = [model, pfec_prune(model, [0.3] * (max(u.stage for u in model.units()) + 1))]
    for m in models:
        theirs, _ = get_model_complexity_info(
            m, (3, res, res), as_strings=False, print_per_layer_stat=False, backend="pytorch",
            ignore_modules=[nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d],
            backend_specific_config={"count_functional": False},
        )
        ours = count_macs(m, (3, res, res))
        assert abs(ours - theirs) / theirs < 0.02, (arch, ours, theirs)


# ---------------------------------------------------------------------------------------------- PFEC
def test_kept_count_rounding():
    assert kept_count(16, 0.1) == 14 and kept_count(64, 0.3) == 44 and kept_count(10, 0.1) == 9
    assert kept_count(90, 0.3) == 63  # 90 * 0.7 is 62.999... in floating point
    assert kept_count(1, 0.9) == 1 and kept_count(3, 0.0) == 3


@pytest.mark.parametrize("arch", ["resnet20", "vgg16", "wrn16_8", "preresnet164", "resnet18"])
def test_pfec_ratio_zero_is_identity(arch):
    torch.manual_seed(0)
    model = _randomize_bn(build_model(arch))
    stages = max(u.stage for u in model.units()) + 1
    same = pfec_prune(model, [0.0] * stages)
    assert same is not model and same.widths == model.widths and not same.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def _kept_rows(old_w: torch.Tensor, new_w: torch.Tensor) -> list[int]:
    """Which filters of `old_w` survive in `new_w` (matched by value; inputs may be sliced too)."""
    kept = []
    for row in new_w:
        cols = row.shape[0]
        hits = [i for i in range(old_w.shape[0]) if old_w.shape[1] == cols and torch.equal(old_w[i], row)]
        kept.append(hits[0] if hits else -1)
    return kept


@pytest.mark.parametrize("arch,ratios,skip,layer_ratios", [
    ("resnet20", [0.3, 0.5, 0.6], ["layer2.0"], {}),
    ("vgg16", [0.0, 0.2, 0.0, 0.25, 0.5], [], {"conv1_1": 0.25}),
    ("preresnet164", [0.1, 0.2, 0.3], ["layer1.17"], {}),
    ("wrn16_8", [0.1, 0.2, 0.3], [], {}),
])
def test_pfec_equals_original_with_removed_filters_zeroed(arch, ratios, skip, layer_ratios):
    torch.manual_seed(1)
    model = _randomize_bn(build_model(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = pfec_prune(model, ratios, skip, layer_ratios)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched

    ref = copy.deepcopy(model)
    orig, modules, small_modules = dict(model.named_modules()), dict(ref.named_modules()), dict(small.named_modules())
    for u in ref.units():
        # Ranking uses each conv's own original weights (PFEC's "independent" strategy), even where
        # an earlier unit removes some of its input channels (VGG).
        w = orig[u.conv].weight.detach()
        norms = w.abs().sum(dim=(1, 2, 3))
        n_keep = small_modules[u.conv].out_channels
        # Kept filters are exactly the highest-L1 ones (random weights: no ties).
        top = set(torch.argsort(norms, descending=True)[:n_keep].tolist())
        new_w = small_modules[u.conv].weight.detach()
        if new_w.shape[1] == w.shape[1]:  # conv inputs not sliced: match filters by value
            assert set(_kept_rows(w, new_w)) == top
        removed = sorted(set(range(w.shape[0])) - top)
        with torch.no_grad():  # "removed": the filter is zero and nothing downstream reads its channel
            modules[u.conv].weight[removed] = 0
            for c in u.consumers:
                modules[c].weight[:, removed] = 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    assert count_params(small) < count_params(model)


def test_pfec_preresnet_bottleneck_widths_and_skip_prefix():
    model = build_model("preresnet164")
    small = pfec_prune(model, [0.5, 0.5, 0.5], skip=["layer1.17"], layer_ratios={"layer3.0.conv2": 0.25})
    b = small.layer1[0]
    assert (b.conv1.out_channels, b.bn2.num_features, b.conv2.in_channels) == (8, 8, 8)
    assert (b.conv2.out_channels, b.bn3.num_features, b.conv3.in_channels) == (8, 8, 8)
    assert b.conv3.out_channels == 64 and small.layer1[1].bn1.num_features == 64  # residual stream untouched
    skipped = small.layer1[17]
    assert (skipped.conv1.out_channels, skipped.conv2.out_channels) == (16, 16)
    assert (small.layer3[0].conv1.out_channels, small.layer3[0].conv2.out_channels) == (32, 48)
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pfec_compounds_over_iterations_and_vgg_classifier_is_sliced():
    m = build_model("resnet20")
    for expect in ([8, 16, 32], [4, 8, 16], [2, 4, 8], [1, 2, 4], [1, 1, 2], [1, 1, 1]):
        m = pfec_prune(m, [0.5, 0.5, 0.5])
        assert m.widths == [w for w in expect for _ in range(3)]
    vgg = pfec_prune(build_model("vgg16"), [0, 0, 0, 0, 0.5])
    assert vgg.classifier[0].in_features == 256 and vgg.widths[-3:] == [256, 256, 256]


def test_pfec_bad_schedules_are_bad_values_naming_the_argument():
    model = build_model("resnet20")
    with pytest.raises(BadValue, match=r"^stage_ratios: the model has 3 stages, got 5") as e:
        pfec_prune(model, [0.1] * 5)
    assert e.value.arg == "stage_ratios"
    with pytest.raises(BadValue, match=r"^skip: 'layer1.7' matches no prunable unit of this model \(names like"):
        pfec_prune(model, [0.1] * 3, skip=["layer1.7"])
    with pytest.raises(BadValue, match=r"^layer_ratios: 'conv1_1' matches no prunable unit"):
        pfec_prune(model, [0.1] * 3, layer_ratios={"conv1_1": 0.2})
    with pytest.raises(BadValue, match=r"^layer_ratios: layer1: must be in \[0, 1\), got 1.0"):
        pfec_prune(model, [0.1] * 3, layer_ratios={"layer1": 1.0})


# ------------------------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("arch", ["resnet20", "vgg16", "preresnet164", "resnet18"])
def test_slice_units_first_k_equals_zeroing_the_rest(arch):
    torch.manual_seed(2)
    model = _randomize_bn(build_model(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = model.units()
    keep = {u.name: torch.arange(max(1, w // 2)) for u, w in zip(units[::2], model.widths[::2])}  # others whole
    small = slice_units(model, keep)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    assert small.widths == [len(keep[u.name]) if u.name in keep else w for u, w in zip(units, model.widths)]
    assert not small.training and small.arch == model.arch

    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for u in units:
            if u.name in keep:
                n = len(keep[u.name])
                modules[u.conv].weight[n:] = 0
                for c in u.consumers:
                    modules[c].weight[:, n:] = 0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    assert slice_units(model.train(), {}).training  # train mode carried over; {} keeps everything
    assert slice_units(model, {}).widths == model.widths


def test_slice_units_rejects_bad_keep():
    model = build_model("resnet20")
    with pytest.raises(ValueError, match="does not have: \\['nope'\\]"):
        slice_units(model, {"nope": [0]})
    for bad in ([], [0, 0], [16], [-1], [[0, 1]]):
        with pytest.raises(ValueError, match=r"keep\['layer1.0'\]"):
            slice_units(model, {"layer1.0": bad})
    with pytest.raises(TypeError, match="zoo model"):
        slice_units(nn.Conv2d(3, 4, 3), {})


# ----------------------------------------------------------------------------------------------- MWP
def test_mwp_global_threshold_exact_fraction_and_cumulative():
    torch.manual_seed(0)
    model = build_model("resnet20")
    masks = mwp_masks(model, 0.4)
    convs = conv_weights(model)
    assert set(masks) == set(convs)  # conv weights only: no FC, no BN
    n = sum(w.numel() for w in convs.values())
    assert sparsity(masks) == round(0.4 * n) / n
    kept = torch.cat([w.detach().abs()[masks[k] > 0] for k, w in convs.items()])
    pruned = torch.cat([w.detach().abs()[masks[k] == 0] for k, w in convs.items()])
    assert pruned.max() <= kept.min()  # one threshold for all layers pooled
    per_layer = [float((m == 0).float().mean()) for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.1  # ... so layers end up with different sparsity

    # Make previously pruned weights large: they still stay pruned at the next target.
    with torch.no_grad():
        for k, w in convs.items():
            w[masks[k] == 0] = 100.0
    masks2 = mwp_masks(model, 0.6, masks)
    assert sparsity(masks2) == round(0.6 * n) / n
    assert all(((masks[k] == 0) <= (masks2[k] == 0)).all() for k in masks)
    # A lower target never un-prunes.
    assert sparsity(mwp_masks(model, 0.1, masks2)) == sparsity(masks2)


def test_mwp_iterations_compose_and_targets_schedule():
    torch.manual_seed(0)
    model = build_model("resnet20")
    before = count_nonzero_params(model)
    targets = [0.5, 0.7]
    masks = mwp_masks(model, sparsity_target(targets, 1))
    new = copy.deepcopy(model)
    apply_masks(new, masks)
    assert count_nonzero_params(model) == before  # mwp_masks leaves its input alone
    n_conv = sum(w.numel() for w in conv_weights(model).values())
    assert count_nonzero_params(new) <= before - round(0.5 * n_conv)
    masks2 = mwp_masks(new, sparsity_target(targets, 2), masks)
    assert sparsity(masks2) == round(0.7 * n_conv) / n_conv
    with pytest.raises(BadValue, match=r"^targets: iteration 3 needs a target, only 2 given \[0.5, 0.7\]"):
        sparsity_target(targets, 3)
    with pytest.raises(ValueError, match="1-based"):
        sparsity_target(targets, 0)
    small = pfec_prune(model, [0.5] * 3)
    assert small.widths[0] == 8 and model.widths[0] == 16


def _step(model, opt, x, y, masks=None, reapply=True):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if masks:
        mask_gradients(model, masks)
    opt.step()
    if masks and reapply:
        apply_masks(model, masks)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd_nesterov_wd", "adam", "adamw"])
def test_masked_weights_stay_exactly_zero_through_training(make_opt):
    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    opt = make_opt(model.parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(2):  # momentum / Adam moments are non-zero before pruning, as after a retrain
        _step(model, opt, x, y)
    masks = mwp_masks(model, 0.5)
    apply_masks(model, masks)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(3):
        _step(model, opt, x, y, masks)
    params = dict(model.named_parameters())
    for k, m in masks.items():
        assert (params[k][m == 0] == 0).all(), k
        assert not torch.equal(params[k][m > 0], start[k][m > 0]), k  # the rest still trains

    # Without re-applying after step, momentum/moments (and decay) would revive pruned weights:
    # this is why the loop must call apply_masks after optimizer.step().
    _step(model, opt, x, y, masks, reapply=False)
    assert any((params[k][m == 0] != 0).any() for k, m in masks.items())


def test_mask_constraint_holds_masked_weights_at_zero_under_sgd_momentum_decay():
    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    _step(model, opt, x, y)  # non-zero momentum before pruning
    masks = mwp_masks(model, 0.5)
    apply_masks(model, masks)
    constraint = MaskConstraint(masks).to("cpu")
    params = dict(model.named_parameters())
    start = {k: params[k].detach().clone() for k in masks}
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        constraint.before_step(model)
        assert all((params[k].grad[m == 0] == 0).all() for k, m in masks.items())
        opt.step()
        constraint.after_step(model)
        for k, m in masks.items():
            assert (params[k][m == 0] == 0).all(), k
    assert all(not torch.equal(params[k][m > 0], start[k][m > 0]) for k, m in masks.items())
    with pytest.raises(KeyError, match="does not have"):
        MaskConstraint({"fc.nope": torch.ones(1)}).after_step(model)
