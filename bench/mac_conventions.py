"""Which counting convention reproduces the KESI paper's 61.5 % MACs reduction for ResNet-56 PFEC?

    .venv/bin/python bench/mac_conventions.py --json [--config configs/kesi/cifar10_resnet56_pfec.yaml]

The widths come from `kesi plan` of the config (they reproduce the authors' per-iteration parameter
counts exactly); each convention counts every iteration's network on one 32x32 image and reports the
reduction from the baseline:
  conv_linear        kesi_dist's count (`kesi_dist.pruning.count_macs`): multiply-adds of convs and linears
  reference_counter  the counter of the reference's lineage (rethinking-network-pruning compute_flops.py):
                     convs and linears as 2 ops per multiply-add (+ bias), BatchNorm 2 per element,
                     ReLU 1 per element per call, the final 8x8 average pool; the functional option-A
                     shortcut uncounted, as there
  reference_counter_1op  the same with one op per multiply-add (its multiply_adds=False)
  block_convs        only the convs inside residual blocks (stem and classifier left out)
  pruned_convs       only the pruned convs (each block's conv1)
  no_skip            conv_linear of the chain without PFEC's skipped (sensitive) blocks
  params             the parameter reduction, for comparison
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _count(model: nn.Module, *, ops_per_mac: int = 2, norms: bool = True, only=None) -> float:
    """Ops of one forward pass of a CIFAR ResNet on one 32x32 image (see the module docstring)."""
    import kesi_dist.models.resnet as resnet

    total, hooks = [0.0], []

    def conv(m, i, o):
        total[0] += (m.kernel_size[0] * m.kernel_size[1] * m.in_channels / m.groups * ops_per_mac
                     + (m.bias is not None)) * o[0].numel()

    def linear(m, i, o):
        total[0] += m.weight.numel() * ops_per_mac + m.bias.numel()

    def bn(m, i, o):
        total[0] += 2 * i[0][0].numel()

    for name, m in model.named_modules():
        if only is not None and not (isinstance(m, nn.Conv2d) and only(name)):
            continue
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.BatchNorm2d) and norms:
            hooks.append(m.register_forward_hook(bn))
    relu = F.relu

    def counted_relu(x, *a, **k):  # the zoo calls ReLU functionally; the reference's hook saw each call
        total[0] += x[0].numel()
        return relu(x, *a, **k)

    resnet.F.relu = counted_relu if norms and only is None else relu
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 32, 32))
    finally:
        resnet.F.relu = relu
        for h in hooks:
            h.remove()
    if norms and only is None:
        total[0] += 64 * 8 * 8  # AvgPool2d(8) over the last stage: kernel ops x outputs
    return total[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "kesi" / "cifar10_resnet56_pfec.yaml"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from kesi_dist.config import load_config
    from kesi_dist.models import build_model
    from kesi_dist.plan import plan_schedule

    cfg = load_config(args.config)
    rows = plan_schedule(cfg)["iterations"]
    no_skip = plan_schedule(load_config(args.config, ["prune.skip=[]"]))["iterations"]
    models = [build_model(cfg.model.arch, 10, r["widths"], **cfg.model.options()) for r in rows]
    conventions = {
        "conv_linear": [r["macs"] for r in rows],
        "reference_counter": [_count(m) for m in models],
        "reference_counter_1op": [_count(m, ops_per_mac=1) for m in models],
        "block_convs": [_count(m, norms=False, only=lambda n: n.startswith("layer")) for m in models],
        "pruned_convs": [_count(m, norms=False, only=lambda n: n.startswith("layer") and n.endswith("conv1"))
                         for m in models],
        "no_skip": [r["macs"] for r in no_skip],
        "params": [r["params"] for r in rows],
    }
    reductions = {k: [round(100 * (1 - v / vals[0]), 2) for v in vals] for k, vals in conventions.items()}
    out = {"config": args.config, "paper_final_reduction_pct": 61.5, "final_params_m": rows[-1]["params"] / 1e6,
           "reduction_pct_per_iteration": reductions,
           "closest": min(reductions, key=lambda k: abs(reductions[k][-1] - 61.5))}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in reductions.items():
            print(f"{k:>22}: final {v[-1]:6.2f} %   (per iteration {v[1:]})")
        print(f"paper: 61.5 %; closest: {out['closest']}")


if __name__ == "__main__":
    main()
