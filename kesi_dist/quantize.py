"""INT8 after pruning: onnxruntime static quantization of a snapshot, calibrated on held-out images.

    q = quantize_snapshot("runs/qs/snapshots/student.pt", data_dir="runs/qs/data", holdout=0.1, seed=0,
                          resolution=16, augment="cifar")
    export_run_int8("runs/qs", "student.int8.onnx")                 # `kesi export runs/qs --int8 --out ...`
    q["int8"]                       # bytes of the int8 ONNX model (what `kesi export RUN --int8` writes)
    q["int8_acc"], q["fp32_acc"]    # test top-1 of the int8 and the fp32 ONNX models, every test image
    time_onnx([q["fp32"], q["int8"]], 16, batch=64, threads=2)   # interleaved onnxruntime ms

The snapshot is exported as `kesi export` does (ONNX, opset 17, BatchNorm folded into the convs), then
quantized by `onnxruntime.quantization.quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear
pairs, which onnxruntime fuses into its int8 kernels when it loads the model): weights int8, symmetric,
one scale per output channel (`per_channel=True`), in 7 bits (`reduce_range=True`); activations uint8
with one scale and zero point per tensor (the U8S8 pair onnxruntime recommends for x86 CPUs), their
ranges set by a calibrator (min/max by default) over held-out training images (`kesi_dist.data.holdout`):
the test split is never read until the quantized model is scored on it. Calibration is deterministic (the
same images in the same order, seeded by the run's seed), so the stage and `kesi export --int8` write the
same bytes.

Why 7-bit weights: on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) onnxruntime's U8S8 kernels
multiply-add pairs of uint8 x int8 products into int16 (VPMADDUBSW), which saturates when both are large;
onnxruntime's quantization guide names `reduce_range` as the remedy. With 7-bit weights no pair sum can
saturate, so the accumulations are exact on every CPU, VNNI or not (on the KESI quickstart's student, on
this project's AVX2 machines, full 8-bit weights lost points of held-out top-1 that 7-bit weights did not:
bench/int8_speed.py --run).

Pruned widths are kept as they are: quantization changes no tensor's shape, so an unaligned width stays
unaligned in the int8 kernels too (`method.prune.round_to` and the other methods' `round_to` align widths
before training; `bench/int8_speed.py --align` times a conv stack at aligned and unaligned widths in both
precisions).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from onnxruntime.quantization import CalibrationDataReader

from kesi_dist.errors import UsageError

__all__ = ["CALIBRATIONS", "HoldoutReader", "fp32_onnx", "quantize_onnx", "quantize_model", "quantize_snapshot", "top1",
           "time_onnx", "export_run_int8", "DEFAULT_BATCH", "DEFAULT_THREADS"]

CALIBRATIONS = ("minmax", "percentile", "entropy")
# Latency without a latency stage in the run: `kesi latency profile`'s defaults.
DEFAULT_BATCH, DEFAULT_THREADS = 64, 2


class HoldoutReader(CalibrationDataReader):
    """onnxruntime's calibration input: batches of held-out training images (`split="holdout"` of the
    run's prepared data), served as evaluation serves them (no augmentation), `images` of them at most,
    drawn in an order seeded by `seed`. `positions` lists every image served so far (positions in
    train.beton).

    Raises:
        UsageError: `holdout` is 0 (there is no held-out split; calibrating on the test split would
            tune the model to the images it is scored on).
    """

    def __init__(self, data_dir: str | Path, *, holdout: float, seed: int, resolution: int, augment: str,
                 images: int = 256, batch_size: int = 32):
        from kesi_dist.data.loaders import make_loader

        if not holdout:
            raise UsageError("int8 calibration reads held-out training images only, and this run has none "
                             "(data.holdout: 0); the test split is never calibrated on: set data.holdout (e.g. 0.1)")
        self.loader = make_loader(data_dir, "holdout", batch_size=batch_size, resolution=resolution, augment=augment,
                                  backend="torch", num_workers=0, seed=seed, shuffle=True, drop_last=False,
                                  return_indices=True, holdout=holdout, holdout_seed=seed)
        self.loader.set_window(0, min(int(images), self.loader.num_samples))
        self.positions: list[int] = []
        self._batches = None

    def get_next(self) -> dict | None:
        if self._batches is None:
            self.loader.set_epoch(0)  # every pass (stage, export, rewind) serves the same images in the same order
            self._batches = iter(self.loader)
        batch = next(self._batches, None)
        if batch is None:
            return None
        x, _, idx = batch
        self.positions.extend(int(i) for i in idx)
        return {"input": x.numpy()}

    def rewind(self) -> None:
        self._batches = None


def quantize_onnx(fp32: bytes, reader, *, calibration: str = "minmax", reduce_range: bool = True) -> bytes:
    """The int8 (QDQ, per-channel) ONNX model of `fp32`, its activation ranges calibrated on `reader`
    (`reduce_range=False`: full 8-bit weights, see the module docstring; bench/int8_speed.py compares)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration not in CALIBRATIONS:
        raise UsageError(f"quantize.calibration {calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    with tempfile.TemporaryDirectory(prefix="kesi-int8-") as tmp:
        src, pre, out = (str(Path(tmp) / n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(fp32)
        # Shape inference and onnxruntime's graph clean-up first, as onnxruntime's quantization guide advises.
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        return Path(out).read_bytes()


def fp32_onnx(model: torch.nn.Module, resolution: int) -> bytes:
    from kesi_dist.export import to_onnx

    with warnings.catch_warnings():  # the TorchScript-based exporter's deprecation notices
        warnings.simplefilter("ignore")
        return to_onnx(model.eval(), torch.zeros(1, 3, resolution, resolution))


def quantize_model(model: torch.nn.Module, reader, *, resolution: int, calibration: str = "minmax"
                   ) -> tuple[bytes, bytes]:
    """(fp32 ONNX, int8 ONNX) of a zoo or torchvision/timm model (eval mode, masks applied)."""
    fp32 = fp32_onnx(model, resolution)
    return fp32, quantize_onnx(fp32, reader, calibration=calibration)


def _session(data: bytes):
    import onnxruntime as ort

    # Default options: the session the model card's snippet opens, so its top-1 is the one recorded.
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def top1(models: list[bytes], data_dir: str | Path, *, resolution: int, augment: str, batch_size: int = 256,
         split: str = "val", holdout: float = 0, seed: int = 0) -> tuple[list[float], int]:
    """(top-1 of each ONNX model on every image of `split` (the test split; "holdout": the held-out one of
    `holdout` and `seed`), number of images)."""
    from kesi_dist.data.loaders import make_loader

    sessions = [_session(m) for m in models]
    loader = make_loader(data_dir, split, batch_size=batch_size, resolution=resolution, augment=augment,
                         backend="torch", num_workers=0, shuffle=False, drop_last=False, holdout=holdout,
                         holdout_seed=seed)
    correct, total = [0] * len(models), 0
    for x, y in loader:
        labels = y.numpy()
        for i, s in enumerate(sessions):
            correct[i] += int((s.run(None, {"input": x.numpy()})[0].argmax(1) == labels).sum())
        total += len(labels)
    return [c / total for c in correct], total


def time_onnx(models: list[bytes], resolution: int, *, batch: int, threads: int, warmup: int = 3,
              repeats: int = 30) -> list[float]:
    """Median ms of each ONNX model at `batch` and `threads` in onnxruntime, interleaved round by round
    (the latency stage's sessions and timing, `kesi_dist.latency`)."""
    from kesi_dist.latency import ort_session, time_interleaved

    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).numpy()
    sessions = [ort_session(m, threads) for m in models]
    return time_interleaved([lambda s=s: s.run(None, {"input": x}) for s in sessions], warmup, repeats)


def quantize_snapshot(checkpoint: str, *, data_dir: str | Path, holdout: float, seed: int, resolution: int,
                      augment: str, images: int = 256, calibration: str = "minmax") -> dict:
    """Quantize snapshot file `checkpoint` on the held-out images of prepared data `data_dir` and score
    the fp32 and int8 ONNX models on its test split.

    Returns:
        {"fp32", "int8" (ONNX bytes), "fp32_acc", "int8_acc", "test_images", "calibration":
        {"split": "holdout", "images", "method", "positions" (in train.beton)}}.

    Raises:
        UsageError: the run has no held-out split (`HoldoutReader`) or an unknown calibration method.
    """
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    # onnxruntime's histogram calibrators (percentile, entropy) stack every batch: they need equal batches.
    reader = HoldoutReader(data_dir, holdout=holdout, seed=seed, resolution=resolution, augment=augment, images=images,
                           batch_size=32 if calibration == "minmax" else 1)
    fp32, int8 = quantize_model(model, reader, resolution=resolution, calibration=calibration)
    (fp32_acc, int8_acc), total = top1([fp32, int8], data_dir, resolution=resolution, augment=augment)
    served = sorted(set(reader.positions))
    return {"fp32": fp32, "int8": int8, "fp32_acc": fp32_acc, "int8_acc": int8_acc, "test_images": total,
            "calibration": {"split": "holdout", "images": len(served), "method": calibration,
                            "positions": served}}


def _run_settings(run: str, config_text: str) -> dict:
    """What calibration reads from a run's config.yaml, each field checked (RunError naming it)."""
    import yaml

    from kesi_dist.errors import RunError

    where = f"{run}/config.yaml"
    try:
        cfg = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError:
        cfg = None
    if not isinstance(cfg, dict):
        raise RunError(f"{where}: not a mapping of sections; int8 calibration reads data.holdout and seed from it")
    data, q = cfg.get("data") or {}, cfg.get("quantize") or {}
    fields = {  # name: (config key, value, type)
        "holdout": ("data.holdout", data.get("holdout", 0), (int, float)), "seed": ("seed", cfg.get("seed", 0), int),
        "resolution": ("data.resolution", data.get("resolution", 32), int),
        "augment": ("data.augment", data.get("augment", "cifar"), str),
        "images": ("quantize.calibration_images", q.get("calibration_images", 256), int),
        "calibration": ("quantize.calibration", q.get("calibration", "minmax"), str)}
    for key, value, kind in fields.values():
        bad = isinstance(value, bool) or not isinstance(value, kind) or (key == "quantize.calibration" and value
                                                                          not in CALIBRATIONS)
        if bad or (not isinstance(value, str) and value < 0):
            raise RunError(f"{where}: {key}: {value!r} is not a valid value; restore the run's config.yaml")
    return {name: value for name, (_, value, _) in fields.items()}


def export_run_int8(run: str, out: str | Path, *, snapshot: str = "student") -> dict:
    """`kesi export RUN --int8`: snapshot `snapshot` of run folder `run` as an int8 ONNX model, calibrated on
    the run's held-out images as its quantize stage is (the same images, so the same bytes), scored with
    the fp32 ONNX model on every test image, then written atomically.

    Returns:
        {"format": "onnx-int8", "path", "snapshot", "fp32_acc", "int8_acc", "test_images", "calibration":
        {split, images, method}, "bytes", "fp32_bytes"}.

    Raises:
        UsageError: what `kesi_dist.export.run_snapshot` refuses, or a run without a held-out split.
        RunError: the run's data folder is gone, or its config.yaml is damaged.
    """
    from kesi_dist import storage
    from kesi_dist.errors import RunError
    from kesi_dist.export import readable, run_snapshot
    from kesi_dist.storage.atomic import atomic_write

    out = Path(out)
    run, manifest, config_text = run_snapshot(run, snapshot, out, "onnx")
    settings = _run_settings(run, config_text)
    if not settings["holdout"]:
        raise UsageError(f"--int8: run {run} has no held-out split (data.holdout: 0), and int8 calibration reads "
                         "held-out training images only, never the test split; export fp32 (--format onnx) instead")
    data_dir = (manifest.get("stages", {}).get("data") or {}).get("path")
    if not data_dir or not storage.exists(storage.join(data_dir, "meta.json")):
        raise RunError(f"--int8: the run's data folder {data_dir} is gone; calibration needs its held-out images and "
                       "scoring its test split (restore it, or `kesi data prepare` it there again)")
    q = quantize_snapshot(storage.join(run, manifest["snapshots"][snapshot]["checkpoint"]), data_dir=data_dir,
                          **settings)
    atomic_write(out, lambda f: f.write(q["int8"]))
    readable(out)
    cal = q["calibration"]
    return {"format": "onnx-int8", "path": str(out), "snapshot": snapshot, "fp32_acc": q["fp32_acc"],
            "int8_acc": q["int8_acc"], "test_images": q["test_images"], "bytes": len(q["int8"]),
            "fp32_bytes": len(q["fp32"]), "calibration": {k: cal[k] for k in ("split", "images", "method")}}
