"""A measured latency model: what a pruned network costs on this machine, built from its units' costs.

    table = profile("resnet56", 10, 32, batch=64, threads=2)    # `kesi latency profile`
    measure([model], 32, batch=64, threads=2)                     # the latency stage, after a run

Reading a table and predicting from it is plain Python (`kesi_dist.latency_table`); this module
measures (torch, onnxruntime).

A unit's piece is its conv, its norms, a ReLU and the conv that reads its channels: for a basic-block
ResNet, the residual branch. Each piece is exported through `kesi export`'s ONNX path at every width of
a grid and timed in onnxruntime at the input shape it has inside the network; so is the whole unpruned
network. The prediction for widths w is

    full_ms + sum over units of (piece_ms(w_u) - piece_ms(full width of u))

exact at the unpruned widths. What the pieces share (their input and output layout reorders, the
residual stream) cancels in the differences; widths between grid points are interpolated linearly.
Units whose channels feed another unit's conv (VGG, bottleneck ResNets) would interact, so they are
refused rather than mispredicted. The table is keyed by what its numbers depend on (CPU, runtime
version, threads, batch, architecture, resolution) and `latency_table.check_table` says when it does not match.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.export import to_onnx
from kesi_dist.latency_table import SCHEMA, despike, table_key
from kesi_dist.models import build_model, default_widths
from kesi_dist.models.sources import is_source_arch

__all__ = ["profile", "measure", "check_profilable", "grid_for", "check_output", "ort_session", "time_interleaved"]


def grid_for(channels: int, step: int = 8, dense_up_to: int = 64) -> list[int]:
    """Every width up to `dense_up_to` (misaligned widths are where time is lost), then every `step`-th."""
    return sorted({*range(1, min(channels, dense_up_to) + 1), *range(step, channels + 1, step), channels})


def ort_session(data: bytes, threads: int):
    """An onnxruntime CPU session of the ONNX bytes `data`: `threads` intra-op threads, sequential, idle
    threads not spinning (what every timing here and the int8 comparison use)."""
    import onnxruntime as ort  # seconds to import: only where a session is made

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle threads would otherwise spin after each run and steal the CPU from the next timed session.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _onnx(model: nn.Module, sample: torch.Tensor) -> bytes:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices, once per piece
        warnings.simplefilter("ignore")
        return to_onnx(model.eval(), sample)


def time_interleaved(runners: list, warmup: int, repeats: int) -> list[float]:
    """Median ms of each runner; runners interleaved round by round so drifting load hits all alike."""
    for run in runners:
        for _ in range(warmup):
            run()
    samples = [[] for _ in runners]
    for _ in range(repeats):
        for run, s in zip(runners, samples):
            t = time.perf_counter()
            run()
            s.append(1000 * (time.perf_counter() - t))
    return [statistics.median(s) for s in samples]


def _input_shapes(model: nn.Module, resolution: int) -> dict[str, tuple]:
    shapes, hooks = {}, []

    def hook(name):
        def record(mod, inp, out) -> None:  # returning a value would replace the module's output
            shapes[name] = tuple(inp[0].shape)
        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return shapes


def _piece(model: nn.Module, unit) -> nn.Module:
    mods = dict(model.named_modules())
    return nn.Sequential(mods[unit.conv], *(mods[n] for n in unit.norms), nn.ReLU(), *(mods[n] for n in unit.consumers))


def _signature(unit, mods: dict, shapes: dict) -> str:
    """Units with the same signature have the same piece at every width: profiled once."""
    parts = []
    for n in (unit.conv, *unit.consumers):
        c = mods[n]
        parts.append(f"{c.in_channels}>{c.out_channels}k{c.kernel_size[0]}s{c.stride[0]}@{shapes[n][2]}x{shapes[n][3]}")
    return "|".join(parts)


def check_profilable(arch: str, where: str = "") -> None:
    """UsageError, in one line, for a torchvision/timm network: the additive table times each unit as one
    standalone piece (its conv, norms and consumer convs), which a graph network's stream and depthwise
    units (several producers joined by additions, a depthwise conv between) are not."""
    if is_source_arch(arch):
        raise UsageError(f"{where}{arch}: latency tables cover the zoo's networks only (a torchvision/timm network's "
                         "units span several producers joined by additions or depthwise convs, so their costs are "
                         "not separable into standalone pieces); budget it by MACs (kesi plan) instead")


def profile(arch: str, num_classes: int, resolution: int, *, batch: int = 64, threads: int = 2,
            options: dict | None = None, step: int = 8, warmup: int = 3, repeats: int = 15,
            on_progress=None) -> dict:
    """Time every distinct unit piece of `arch` over its width grid and the whole unpruned network.

    Raises:
        UsageError: `arch` has units that feed each other (the additive model does not hold).
    """

    import onnxruntime as ort

    check_profilable(arch)
    options = dict(options or {})
    full = [int(c) for c in default_widths(arch)]
    base = build_model(arch, num_classes, **options).eval()
    units = base.units()
    convs = {u.conv for u in units}
    if any(c in convs for u in units for c in u.consumers):
        raise UsageError(f"{arch}: its prunable units feed each other's convs, so their costs are not additive; "
                         "latency profiling supports basic-block ResNets (resnet20/32/56/110, resnet18/34, wrn)")
    torch.set_num_threads(threads)
    mods = dict(base.named_modules())
    shapes = _input_shapes(base, resolution)
    sigs = {u.name: _signature(u, mods, shapes) for u in units}
    pieces: dict[str, dict] = {}
    fixed: list[dict] = []
    for i, u in enumerate(units):
        if sigs[u.name] in pieces:
            continue
        grid = grid_for(full[i], step)
        shape = (batch, *shapes[u.conv][1:])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        runners = []
        for w in grid:
            widths = list(full)
            widths[i] = w
            piece = _piece(build_model(arch, num_classes, widths, **options).eval(), u)
            sess = ort_session(_onnx(piece, x[:1]), threads)
            runners.append(lambda s=sess, x=x.numpy(): s.run(None, {"input": x}))
        ms = time_interleaved(runners, warmup, repeats)
        fixed += despike(sigs[u.name], grid, ms, lambda idx: time_interleaved([runners[j] for j in idx], 1, repeats))
        pieces[sigs[u.name]] = {"widths": grid, "ms": [round(m, 4) for m in ms]}
        if on_progress is not None:
            on_progress(len(pieces), len(set(sigs.values())))
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    sess = ort_session(_onnx(base, x[:1]), threads)
    whole = lambda: sess.run(None, {"input": x.numpy()})  # noqa: E731
    full_ms = min(time_interleaved([whole, whole], warmup, repeats))  # two medians: the least is the one load touched least
    return {
        "schema": SCHEMA, "key": table_key(arch, num_classes, resolution, options, batch, threads),
        "onnxruntime": ort.__version__, "torch": torch.__version__, "grid_step": step,
        "full_widths": full, "full_ms": round(full_ms, 4),
        "units": [{"name": u.name, "piece": sigs[u.name]} for u in units], "pieces": pieces, "remeasured": fixed,
    }



def measure(models: list[nn.Module], resolution: int, *, batch: int, threads: int, warmup: int = 3,
            repeats: int = 30) -> list[float]:
    """Median ms of each model in onnxruntime (exported as `kesi export` does) at `batch` and `threads`,
    the models interleaved round by round so that a load change hits them alike."""
    before = torch.get_num_threads()
    try:
        x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).numpy()
        sessions = [ort_session(_onnx(m, torch.from_numpy(x[:1])), threads) for m in models]
        return time_interleaved([lambda s=s: s.run(None, {"input": x}) for s in sessions], warmup, repeats)
    finally:
        torch.set_num_threads(before)


def check_output(path: str | Path, flag: str = "--output") -> Path:
    """A file path that can be written (its folder created, a test file written and removed): checked
    before minutes of profiling; UsageError naming `flag` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file path such as {path / 'table.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".kesi-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable path") from None
    return path
