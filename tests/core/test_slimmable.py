"""The slimmable view of the zoo and supernet training, plain PyTorch: slicing equals the built
sub-network, the sandwich task's gradient is the sum of its losses' gradients, BN recalibration restores
a sub-network's accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kesi_dist.models import build_model
from kesi_dist.models.slimmable import l1_ordered, materialise, recalibrate_bn, run_sliced, width_choices



@pytest.mark.parametrize("arch", ["resnet20", "wrn16_8", "preresnet164", "resnet18"])
def test_a_sliced_run_equals_the_materialised_network(arch):
    torch.manual_seed(0)
    model = l1_ordered(build_model(arch, 10)).eval()
    g = torch.Generator().manual_seed(1)
    widths = [int(torch.randint(1, c + 1, (1,), generator=g)) for c in model.widths]
    x = torch.randn(2, 3, 32, 32)
    small = materialise(model, widths).eval()
    assert small.widths == widths
    torch.testing.assert_close(run_sliced(model, x, widths), small(x), rtol=1e-4, atol=1e-5)
    # Stage by stage too: each stage's slice reads the previous stage's output.
    y = x
    for s in range(model.num_stages):
        z = run_sliced(model, y, widths, stage=s)
        torch.testing.assert_close(z, small.forward_stage(y, s), rtol=1e-4, atol=1e-5)
        y = model.forward_stage(y, s)  # the full previous stage: what a stage supernet is fed


def test_l1_order_keeps_the_function_and_puts_the_strongest_filters_first():
    from kesi_dist.pruning.criteria import l1_filter_norms

    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    ordered = l1_ordered(model).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(ordered(x), model(x), rtol=1e-4, atol=1e-5)
    for u in ordered.units():
        norms = l1_filter_norms(dict(ordered.named_modules())[u.conv].weight)
        assert torch.all(norms[:-1] >= norms[1:])


def test_width_choices():
    assert width_choices([16, 10], [0.25, 0.5, 1.0]) == [[4, 8, 16], [3, 5, 10]]
    assert width_choices([3], [0.1, 1.0]) == [[1, 3]]  # never zero channels
    # aligned: ceil(r C) to the nearest multiple of 8 (never 0, never above C): 4 -> 8, 12 -> 16, 6 -> 8
    assert width_choices([16, 48, 6], [0.25, 0.75, 1.0], round_to=8) == [[8, 16], [16, 40, 48], [6]]


def test_sandwich_gradient_is_the_sum_of_the_separate_losses_gradients():
    from kesi_dist.train.supernet import SupernetTraining

    torch.manual_seed(0)
    base = l1_ordered(build_model("resnet20", 4))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for stage in (1, 2):  # an inner stage (MSE to the baseline's output) and the last one (CE + soft CE)
        net = l1_ordered(build_model("resnet20", 4))
        task = SupernetTraining(teacher=base, stage=stage, ratios=[0.25, 0.5, 1.0], n_random=2, seed=3)
        module = task.prepare(net).train()
        task.set_epoch(0)
        out = task(module, x, y)
        out.loss.backward()
        together = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        assert together and all(net.stage_of(n) == stage for n in together)  # only this stage trains
        net.zero_grad()
        task.set_epoch(0)  # the same configurations again, one loss at a time
        configs = task.configs()
        target, outs, _ = module(x, configs)
        ref = outs[0].detach()
        losses = [F.cross_entropy(outs[0], y) if target is None else F.mse_loss(outs[0], target)]
        for o in outs[1:]:
            losses.append(-(F.softmax(ref, 1) * F.log_softmax(o, 1)).sum(1).mean() if target is None
                          else F.mse_loss(o, ref))
        assert len(losses) == 4  # full, tiny, two random
        separate = {n: torch.zeros_like(g) for n, g in together.items()}
        for loss in losses:
            grads = torch.autograd.grad(loss, [p for n, p in net.named_parameters() if n in together],
                                        retain_graph=True, allow_unused=True)
            for n, g in zip(together, grads):
                if g is not None:
                    separate[n] += g
        for n in together:
            torch.testing.assert_close(together[n], separate[n], rtol=1e-4, atol=1e-6)
        assert configs[0] == net.widths and configs[1] == [w if u.stage != stage else task.choices[i][0]
                                                           for i, (u, w) in enumerate(zip(net.units(), net.widths))]


def test_bn_recalibration_restores_a_sliced_networks_accuracy(tiny_data):
    """A trained net's sub-network with reset running statistics is near chance in eval mode; a few
    calibration batches bring it back to what it scores with the statistics it should have."""
    from kesi_dist.data.loaders import make_loader, split_tensors
    from kesi_dist.train.loop import train_epoch
    from kesi_dist.train.optim import build_optimizer

    torch.manual_seed(0)
    net = build_model("resnet20", 4)
    train = make_loader(tiny_data, "train", batch_size=64, resolution=16, backend="torch", num_workers=0)
    opt = build_optimizer(net.parameters(), optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=0)
    for e in range(2):
        train.set_epoch(e)
        train_epoch(net, train, opt, None)
    x, y = split_tensors(tiny_data, "val", resolution=16, backend="torch")

    def acc(m):
        with torch.no_grad():
            return float((m.eval()(x).argmax(1) == y).float().mean())

    small = materialise(l1_ordered(net), [w // 2 for w in net.widths])
    calib = [x for x, _ in zip((b[0] for b in train), range(4))]
    for m in small.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()  # mean 0, var 1: wrong for every layer of the trained net
    broken = acc(small)
    fixed = acc(recalibrate_bn(small, calib))
    assert fixed > 0.6 and fixed > broken + 0.2, (broken, fixed)
    assert not small.training


@pytest.mark.parametrize("arch", ["resnet20", "preresnet164", "vgg16", "wrn16_8", "resnet18"])
def test_macs_function_prices_a_width_vector_as_the_built_network(arch):
    from kesi_dist.pruning import count_macs, macs_function

    model = build_model(arch, 10)
    price = macs_function(model, (3, 32, 32))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        widths = [int(torch.randint(1, c + 1, (1,), generator=g)) for c in model.widths]
        assert price(widths) == count_macs(build_model(arch, 10, widths), (3, 32, 32))
    assert price(model.widths) == count_macs(model, (3, 32, 32))
