"""Parameter and MAC counts of any model.

MAC convention (the one PFEC and the KESI paper report, and ptflops' conv/linear counts):
  - Conv2d: output elements x (in_channels / groups) x kh x kw per image; bias not counted.
  - Linear: in_features x out_features per row; bias not counted.
  - BatchNorm, ReLU, pooling, residual additions and zero-padding shortcuts are not counted.
  - Weights zeroed by an unstructured mask still count as dense MACs (dense kernels run them).
Counts are for one image (batch size 1) of shape `input_size` = (C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["count_params", "count_nonzero_params", "count_macs", "macs_function"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero (what unstructured pruning reduces)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def _meta_forward(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    # Shapes are all that is needed: run the forward on the meta device (no arithmetic, no memory)
    # by swapping in meta stand-ins for every parameter and buffer.
    meta = {k: torch.empty_like(v, device="meta") for k, v in (*model.named_parameters(), *model.named_buffers())}
    was_training = model.training
    try:
        model.eval()  # BatchNorm1d refuses a batch of one in training mode
        with torch.no_grad():
            functional_call(model, meta, (torch.zeros(1, *input_size, device="meta"),))
    finally:
        model.train(was_training)


def macs_function(model: nn.Module, input_size: tuple[int, int, int]):
    """widths -> `count_macs` of `build_model(arch, widths)`, without building anything: every conv and
    linear layer costs positions x kernel x in x out, and a unit's width is the `out` of its conv (and of
    its other producers) and, times the consumer's fan, part of the `in` of its consumers. A depthwise
    conv reads one channel per filter, so its cost is linear in its unit's width. For searches that price
    thousands of width vectors."""
    units, current = model.units(), list(model.widths)
    out_of = {p: i for i, u in enumerate(units) for p in (u.conv, *u.producers)}
    in_of: dict[str, list[tuple[int, int]]] = {}  # consumer -> [(unit, input channels per unit channel)]
    for i, u in enumerate(units):
        for c, fan in zip(u.consumers, u.consumer_fan or [1] * len(u.consumers)):
            in_of.setdefault(c, []).append((i, fan))
    # (positions x kernel, unit of the output or None, fixed out, [(unit, fan)] of the input, fixed rest of in)
    terms: list[tuple[int, int | None, int, list[tuple[int, int]], int]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inputs, out, name=name):
                if isinstance(mod, nn.Conv2d):
                    kh, kw = mod.kernel_size
                    cin, cout, factor = mod.in_channels // mod.groups, mod.out_channels, kh * kw
                else:
                    cin, cout, factor = mod.in_features, mod.out_features, 1
                positions = out.numel() // out.shape[0] // cout
                ins = in_of.get(name, [])
                terms.append((positions * factor, out_of.get(name), cout, ins,
                              cin - sum(fan * current[i] for i, fan in ins)))

            handles.append(m.register_forward_hook(hook))
    try:
        _meta_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()

    def macs(widths) -> int:
        return int(sum(f * (cout if o is None else widths[o]) * (rest + sum(fan * widths[i] for i, fan in ins))
                       for f, o, cout, ins, rest in terms))

    return macs


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of conv and linear layers for one image; see the module docstring."""
    macs = 0

    def conv_hook(m: nn.Conv2d, inputs, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += (out.numel() // out.shape[0]) * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out: torch.Tensor) -> None:
        nonlocal macs
        macs += (out.numel() // out.shape[0] // m.out_features) * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        _meta_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return int(macs)
