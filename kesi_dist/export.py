"""Export a snapshot as a standard artefact that runs without kesi_dist, verified on export.

    info = export_snapshot("runs/qs/snapshots/student.pt", "onnx", "student.onnx", sample=images)

Formats and what loading them needs:
- ``onnx`` (opset 17, dynamic batch axis): onnxruntime alone.
  ``onnxruntime.InferenceSession(path).run(None, {"input": x})[0]``.
- ``torchscript`` (``torch.jit.trace``): torch alone. ``torch.jit.load(path)(x)``.
- ``safetensors``: the weights (state_dict, BN statistics included) plus ``<out>.widths.json`` with
  ``arch``, ``widths`` and ``num_classes``: the architecture is code, so it is rebuilt by
  ``kesi_dist.models.build_model(arch, num_classes, widths, **options)`` and then
  ``load_state_dict(safetensors.torch.load_file(path))``.
- ``--int8`` (`kesi_dist.quantize.export_run_int8`): ONNX again, int8 inside (onnxruntime static quantization, QDQ,
  per-channel weights), calibrated on the run's held-out images; onnxruntime alone.

PFEC snapshots are already physically small; MWP masks are folded into the weights (masked weights are
exactly zero in the stored tensors, the masks themselves are not exported). The artefact is built in
memory, run on `sample` by the runtime that will load it (onnxruntime, ``torch.jit.load``, a model
rebuilt from the safetensors bytes) and compared with the PyTorch model; only when the outputs agree
within `atol` is it written, atomically, so a failed export leaves no file behind.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from kesi_dist.storage.atomic import atomic_write, atomic_write_text
from kesi_dist.errors import RunError, UsageError

__all__ = ["FORMATS", "OPSET", "export_snapshot", "export_model", "export_run", "run_snapshot", "readable", "widths_path",
           "to_onnx"]

FORMATS = ("onnx", "torchscript", "safetensors")
OPSET = 17


def widths_path(out: str | Path) -> Path:
    """The architecture sidecar of a safetensors export: `<out>.widths.json`."""
    out = Path(out)
    return out.with_name(out.name + ".widths.json")


def to_onnx(model: nn.Module, sample: torch.Tensor) -> bytes:
    """The model as ONNX bytes, as `kesi export` writes it (latency tables time the same graphs)."""
    buf = io.BytesIO()
    # The TorchScript-based exporter: no onnxscript dependency, and constant folding fuses each
    # BatchNorm into its conv in eval mode (fewer, cheaper nodes for onnxruntime).
    torch.onnx.export(
        model, (sample,), buf, dynamo=False, opset_version=OPSET, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
    )
    return buf.getvalue()


def _run_onnx(data: bytes, sample: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": sample.numpy()})[0])


def _to_torchscript(model: nn.Module, sample: torch.Tensor) -> bytes:
    with torch.no_grad():
        traced = torch.jit.trace(model, (sample,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def _run_torchscript(data: bytes, sample: torch.Tensor) -> torch.Tensor:
    loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return loaded(sample)


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _to_safetensors(model: nn.Module) -> bytes:
    from safetensors.torch import save

    meta = {"arch": model.arch, "num_classes": str(model.num_classes), "widths": json.dumps(list(model.widths)),
            "options": json.dumps(model.options)}
    return save(_state_tensors(model), metadata=meta)


def _run_safetensors(data: bytes, arch: str, num_classes: int, widths: list, options: dict,
                     sample: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load

    from kesi_dist.models import build_model

    rebuilt = build_model(arch, num_classes, widths, **options)
    rebuilt.load_state_dict(load(data))
    with torch.no_grad():
        return rebuilt.eval()(sample)


def _sidecar(model: nn.Module, input_size: tuple[int, int, int], weights_name: str) -> dict:
    return {
        "arch": model.arch, "widths": list(model.widths), "num_classes": int(model.num_classes),
        "options": model.options, "input_size": list(input_size), "weights": weights_name,
        "load": ("from safetensors.torch import load_file; from kesi_dist.models import build_model; "
                 "m = build_model(arch, num_classes, widths, **options); m.load_state_dict(load_file(weights)); "
                 "m.eval()"),
    }


def _check_out(out: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file path such as {out / ('model.' + fmt)}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create folder {parent} ({e.strerror}); choose a writable path") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {parent} is not writable; choose a writable path")


# What a run writes at its root (besides its subfolders): never an export's destination.
_RUN_FILES = ("manifest.json", "config.yaml", "lease.json", "report.json", "report.md", "MODEL_CARD.md")


def _check_not_run_file(run: str, out: Path, fmt: str) -> None:
    """Refuse an `out` (or its safetensors sidecar) that is one of the run's own files: an existing file
    of the run folder, anything in one of its subfolders (snapshots/, train/, ...), or a file the run
    writes at its root. A new file at the root (`kesi export . --out student.onnx`) is fine."""
    from kesi_dist import storage

    fs, root = storage.storage_fs(run)
    if fs.type_name != "local":
        return  # `out` is a local path: it cannot be inside a bucket
    root = os.path.realpath(root)
    for target in [out] + ([widths_path(out)] if fmt == "safetensors" else []):
        p = os.path.realpath(target)
        if not p.startswith(root + os.sep):
            continue
        rel = os.path.relpath(p, root)
        if os.path.exists(p) or os.sep in rel or rel in _RUN_FILES or rel.endswith(".png"):
            raise UsageError(f"--out {target}: is {'a file' if os.path.exists(p) else 'a place'} of run {run} "
                             f"({rel}); an export never writes into the run's own files: give a new file "
                             "outside its subfolders, e.g. student." + fmt)


def _build_and_run(model: nn.Module, fmt: str, sample: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """The artefact's bytes and its outputs on `sample`, as the runtime that loads it computes them."""
    if fmt == "onnx":
        data = to_onnx(model, sample)
        return data, _run_onnx(data, sample)
    if fmt == "torchscript":
        data = _to_torchscript(model, sample)
        return data, _run_torchscript(data, sample)
    data = _to_safetensors(model)
    return data, _run_safetensors(data, model.arch, model.num_classes, list(model.widths), model.options, sample)


def readable(path: Path) -> None:
    # A deliverable, not a private temp file: mkstemp creates 0600, give it the umask's permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export_model(model: nn.Module, fmt: str, out: str | Path, *, sample: torch.Tensor, atol: float = 1e-4) -> dict:
    """Export a zoo model already in its final form (eval mode, masks applied); see `export_snapshot`."""
    from kesi_dist.pruning import count_macs, count_nonzero_params, count_params

    out = Path(out)
    _check_out(out, fmt)
    model = model.eval()
    sample = sample.detach().float().cpu().contiguous()
    with torch.no_grad():
        expected = model(sample)
    with warnings.catch_warnings():
        # Deprecation notices of torch.jit and of the TorchScript-based ONNX exporter, and "Slice with
        # steps > 1 is not folded" (the option-A shortcut's subsampling), are noise to a user exporting.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        data, got = _build_and_run(model, fmt, sample)
    if got.shape != expected.shape:
        raise RunError(f"{out}: verification failed: the exported {fmt} model returns shape "
                       f"{tuple(got.shape)}, PyTorch {tuple(expected.shape)}; nothing was written")
    diff = float((got.float() - expected.float()).abs().max())
    if not diff <= atol:  # also catches NaN
        raise RunError(f"{out}: verification failed: max |diff| = {diff:.3g} between the exported {fmt} model "
                       f"and PyTorch exceeds atol {atol:g}; nothing was written")
    input_size = tuple(sample.shape[1:])
    info = {"format": fmt, "path": str(out), "max_abs_diff": diff, "atol": atol,
            "verified_batch": int(sample.shape[0]), "arch": model.arch, "widths": list(model.widths),
            "num_classes": int(model.num_classes), "params": count_params(model),
            "nonzero_params": count_nonzero_params(model), "macs": count_macs(model, input_size),
            "input_size": list(input_size), "bytes": len(data)}
    if fmt == "safetensors":  # the sidecar first: weights without it cannot be rebuilt
        side = widths_path(out)
        atomic_write_text(side, json.dumps(_sidecar(model, input_size, out.name), indent=1) + "\n")
        readable(side)
        info["widths_file"] = str(side)
    atomic_write(out, lambda f: f.write(data))
    readable(out)
    return info


def export_snapshot(checkpoint: str | Path, fmt: str, out: str | Path, *, sample: torch.Tensor | None = None,
                    atol: float = 1e-4, resolution: int = 32, seed: int = 0) -> dict:
    """Export the kesi_dist checkpoint `checkpoint` as `fmt` to `out`, verified against PyTorch.

    Args:
        checkpoint: a snapshot written by `kesi_dist.checkpoint.save_checkpoint` (read weights_only).
        fmt: "onnx", "torchscript" or "safetensors".
        out: the file to write (safetensors also writes `<out>.widths.json`).
        sample: NCHW float batch the export is traced with and verified on (validation images);
            None: a random batch of 4 at `resolution` px (seeded by `seed`).
        atol: largest allowed max |exported - PyTorch| over the sample's outputs.

    Returns:
        {"format", "path", "max_abs_diff", "atol", "verified_batch", "arch", "widths", "num_classes",
        "params", "nonzero_params", "macs", "input_size", "bytes"} (+ "widths_file" for safetensors).

    Raises:
        UsageError: unknown format or an unwritable `out`.
        RunError: unreadable checkpoint, or the exported model disagrees with PyTorch (no file written).
    """
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint

    _check_out(Path(out), fmt)
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))  # masks re-applied: MWP zeros are in the weights
    if sample is None:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(4, 3, resolution, resolution, generator=g)
    return export_model(model, fmt, out, sample=sample, atol=atol)


def _validation_sample(run: str, manifest: dict, config_text: str) -> tuple[torch.Tensor | None, str]:
    """The first batch of the run's validation split, or (None, why not)."""
    import yaml

    from kesi_dist import storage
    from kesi_dist.data.loaders import make_loader

    data = (yaml.safe_load(config_text) or {}).get("data", {}) if config_text else {}
    data_dir = manifest.get("stages", {}).get("data", {}).get("path")
    if not data_dir or not storage.exists(storage.join(data_dir, "meta.json")):
        return None, f"random inputs: the run's data folder {data_dir} is gone"
    # The torch backend in-process: same pixels as FFCV for the (never augmented) val split, without
    # compiling FFCV's pipeline for a single batch.
    # At most 64 images: enough to compare outputs, and three passes of a 224 px batch of 256 would be slow.
    loader = make_loader(data_dir, "val", batch_size=min(64, int(data.get("batch_size", 64))),
                         resolution=int(data.get("resolution", 32)), augment=data.get("augment", "cifar"),
                         backend="torch", num_workers=0)
    return next(iter(loader))[0], "validation images"


def run_snapshot(run: str, snapshot: str, out: Path, fmt: str) -> tuple[str, dict, str]:
    """(run, its manifest, its config.yaml text) once `run` is a run holding snapshot `snapshot` and `out`
    can be written and is none of the run's own files; UsageError or RunError (see `export_run`) otherwise."""
    from kesi_dist import storage

    run = run if storage.is_uri(run) else str(run)
    _check_not_run_file(run, out, fmt)  # before _check_out creates a folder
    _check_out(out, fmt)
    mpath = storage.join(run, "manifest.json")
    if not storage.exists(mpath):
        raise UsageError(f"{run}: not a kesi_dist run directory (no manifest.json); pass the --output folder of `kesi run`")
    try:
        manifest = json.loads(storage.read_text(mpath))
        snaps = manifest["snapshots"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    if snapshot not in snaps:
        why = " (the run has no distilled student: distillation was off or did not finish)" \
            if snapshot == "student" else ""
        names = [n for n in snaps if not n.endswith("_init")]
        raise UsageError(f"--snapshot {snapshot}: not in {mpath}{why}; available: {', '.join(names) or 'none'}")
    cpath = storage.join(run, "config.yaml")
    return run, manifest, storage.read_text(cpath) if storage.exists(cpath) else ""


def export_run(run: str, fmt: str, out: str | Path, *, snapshot: str = "student", atol: float = 1e-4) -> dict:
    """`kesi export`: export snapshot `snapshot` of run directory `run`, verified on validation images.

    The sample is the first validation batch (at most 64 images) of the run's data, at the run's
    `data.resolution` (falling back to random inputs at the
    run's resolution, said in `info["sample"]`, when the data folder is gone). `kesi export --int8` is
    `kesi_dist.quantize.export_run_int8`.

    Returns:
        `export_snapshot`'s dict plus "snapshot" and "sample" (what the verification ran on).

    Raises:
        UsageError: `run` holds no manifest, the snapshot is not in it (the message lists those that
            are), `out` is not writable or is one of the run's own files.
        RunError: unreadable manifest or checkpoint, or the verification failed (nothing written).
    """
    import yaml

    from kesi_dist import storage

    run, manifest, config_text = run_snapshot(run, snapshot, Path(out), fmt)
    sample, what = _validation_sample(run, manifest, config_text)
    res = int(((yaml.safe_load(config_text) or {}).get("data", {}) if config_text else {}).get("resolution", 32))
    info = export_snapshot(storage.join(run, manifest["snapshots"][snapshot]["checkpoint"]), fmt, out, sample=sample,
                           atol=atol, resolution=res)
    return {**info, "snapshot": snapshot, "sample": what}
