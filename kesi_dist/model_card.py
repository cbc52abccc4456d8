"""`<run>/MODEL_CARD.md`: what a user ships, in one page.

The card describes the distilled student (or the last snapshot when distillation was off): the
config the run used (its resolved `config.yaml`, embedded), the data, size and *measured* CPU latency
next to the baseline, the accuracy of every arm of the paper's comparison, the teachers, and the exact
commands to reproduce the run and to export and load the model without kesi_dist.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kesi_dist import storage
from kesi_dist.report import ReportLayout, int8_lines, latency_lines, protocol_line

__all__ = ["write_model_card", "measure_latency"]


def measure_latency(model: nn.Module, resolution: int, batches: tuple[int, ...] = (1, 64), repeats: int = 3,
                    warmup: int = 1, threads: int = 1) -> dict[int, float]:
    """Median wall time in ms of an eval-mode, no-grad forward pass per batch size (PyTorch eager, CPU).

    Quick by design (a model card, not a benchmark: `bench/pruned_latency.py` is the careful one).
    One thread by default: on a shared machine two OpenMP threads wait for each other at every op and
    times swing by 10x or more, while a single thread's time only stretches with the load.
    """
    model = model.eval()
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _time(model, resolution, batches, repeats, warmup, out)
    finally:
        torch.set_num_threads(before)
    return out


def _time(model: nn.Module, resolution: int, batches, repeats: int, warmup: int, out: dict) -> None:
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 3, resolution, resolution)
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append(1000 * (time.perf_counter() - t))
            out[b] = statistics.median(times)


def _latencies(run_root: str, manifest: dict, names: list[str], resolution: int) -> dict[str, dict[int, float]]:
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint

    out = {}
    for name in names:
        entry = manifest["snapshots"].get(name)
        if not entry or not entry.get("checkpoint"):
            continue
        path = storage.join(run_root, entry["checkpoint"])
        if not storage.exists(path):
            continue
        model, _ = model_from_checkpoint(load_checkpoint(path))
        out[name] = measure_latency(model, resolution)
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _m(x) -> str:
    return "–" if x is None else f"{x / 1e6:.3f} M"


def _card(run_root: str, manifest: dict, report: dict, layout: ReportLayout, config_text: str, config_path: str,
          cfg: dict, lat: dict, norm: dict) -> str:
    model_cfg, data_cfg = cfg.get("model", {}), cfg.get("data", {})
    arch = model_cfg.get("arch", "?")
    res = int(data_cfg.get("resolution", 32))
    student_key = layout.deliverable(report)
    student, base = report.get(student_key) if student_key else None, report.get("baseline")
    sname = student["snapshot"] if student else "?"
    data = manifest.get("stages", {}).get("data", {})
    lines = [
        f"# Model card: {layout.card_titles.get(student_key, arch) if student_key else arch}",
        "",
        f"The deliverable is the snapshot `{sname}` (`snapshots/{sname}.pt` next to this card), "
        f"a {arch} with pruned widths, {report['status'] or 'unknown'} run.",
        "",
        "## Size and measured speed (CPU)", "",
        f"PyTorch eager, eval mode, 1 intra-op thread, {res}x{res} px input, median of 3 "
        "runs after a warm-up, measured on the machine that wrote this card when the run finished (other "
        "work on it inflates absolute times; the ratios are what to read; `bench/pruned_latency.py` measures "
        "onnxruntime too).", "",
        "| model | params | nonzero params | MACs | batch-1 latency | batch-64 latency |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in (("baseline", "baseline"), ("student", student_key)):
        r = report.get(key)
        if not r:
            continue
        t = lat.get(r["snapshot"], {})
        lines.append(f"| {label} (`{r['snapshot']}`) | {_m(r['params'])} | {_m(r['nonzero_params'])} | "
                     f"{r['macs'] / 1e6:.1f} M | {t[1]:.2f} ms | {t[64]:.1f} ms |" if t else
                     f"| {label} (`{r['snapshot']}`) | {_m(r['params'])} | {_m(r['nonzero_params'])} | "
                     f"{r['macs'] / 1e6:.1f} M | – | – |")
    if base and student:
        speed = []
        tb, ts = lat.get(base["snapshot"]), lat.get(student["snapshot"])
        if tb and ts:
            speed = [f"measured speed-up {tb[1] / ts[1]:.2f}x at batch 1 and {tb[64] / ts[64]:.2f}x at batch 64"]
        lines += ["", "; ".join([f"Student vs baseline: {base['params'] / student['params']:.2f}x fewer parameters",
                                 f"{base['macs'] / student['macs']:.2f}x fewer MACs "
                                 f"({100 * (1 - student['macs'] / base['macs']):.1f} % reduction)", *speed]) + "."]
    lines += [line.replace("## Latency", "### Latency") for line in latency_lines(report)]
    lines += int8_lines(report, "###")
    lines += ["", "## Accuracy of every arm", "",
              f"Top-1 on the test split of {data_cfg.get('source', '?')} (`report.json`). {protocol_line(report)}", "",
              "| arm | top-1 | params | MACs | snapshot |", "|---|---|---|---|---|"]
    for label, key, _ in layout.rows:
        r = report.get(key)
        if not r:
            lines.append(f"| {label} | – | – | – | – |")
            continue
        snap = r.get("snapshot") or f"{len(r.get('teachers', []))} teachers (sums)"
        lines.append(f"| {label} | {_pct(r['val_acc'])} | {_m(r['params'])} | {r['macs'] / 1e6:.1f} M | {snap} |")
    if layout.teachers is not None:  # the method's own words for what its student learnt from
        lines += ["", "## Teachers", "", *layout.teachers(report)]
    lines += ["", "## Data", "",
              f"- source: `{data_cfg.get('source', '?')}`" + (f" from `{data_cfg['root']}`" if data_cfg.get("root") else ""),
              f"- prepared data: `{data.get('path', '?')}`",
              f"- {_split_sizes(data)}, "
              f"{data.get('num_classes', '?')} classes",
              f"- input resolution: {res}x{res} px, augmentation `{data_cfg.get('augment', '?')}`; inputs are "
              "normalised with the dataset's mean/std (`meta.json` of the prepared data)",
              "", "## Software", "", _versions(),
              "", "## Reproduce", "",
              "The run's resolved config is `config.yaml` next to this card (every key, defaults filled in); "
              "from this folder:", "",
              "```bash", "kesi run config.yaml --output NEW_RUN_DIR", "```", "",
              "<details><summary>config.yaml</summary>", "", "```yaml", config_text.rstrip(), "```", "", "</details>",
              "", "## Export and load", "",
              "```bash",
              "# from this folder (the run folder); or pass its path or storage URI instead of .",
              "kesi export . --format onnx --out student.onnx                # needs onnxruntime only",
              "kesi export . --format torchscript --out student.ts           # needs torch only",
              "kesi export . --format safetensors --out student.safetensors  # + student.safetensors.widths.json",
              "```", "",
              "Each export runs the written model on a batch of validation images and checks it matches PyTorch "
              "(max |diff| <= 1e-4). Loading:", "",
              "```python",
              "import numpy as np, onnxruntime as ort, torch",
              "from PIL import Image",
              *_preprocessing(norm, res, data_cfg.get("augment", "cifar")),
              "logits = ort.InferenceSession(\"student.onnx\").run(None, {\"input\": x})[0]",
              "ts = torch.jit.load(\"student.ts\").eval()",
              "logits_ts = ts(torch.from_numpy(x))",
              *([f"CLASSES = {norm['class_names']!r}", "print(CLASSES[int(logits.argmax())])"]
                if norm.get("class_names") else []),
              "```", "",
              *_int8_snippet(report, norm, res, data_cfg.get("augment", "cifar")),
              "The safetensors file holds weights only; the architecture is rebuilt from the widths file:", "",
              "```python",
              "import json; from safetensors.torch import load_file; from kesi_dist.models import build_model",
              "spec = json.load(open(\"student.safetensors.widths.json\"))",
              "model = build_model(spec[\"arch\"], spec[\"num_classes\"], spec[\"widths\"], **spec[\"options\"])",
              "model.load_state_dict(load_file(\"student.safetensors\")); model.eval()",
              "```", ""]
    return "\n".join(lines)


def _int8_snippet(report: dict, norm: dict, res: int, augment: str) -> list[str]:
    """Loading the int8 model (when the run quantized its deliverable): onnxruntime alone, as for fp32."""
    q = report.get("int8")
    if not q:
        return []
    name = q["file"].rsplit("/", 1)[-1]
    return [f"The int8 model is `{q['file']}` in this folder; `kesi export . --int8 --out {name}` writes the same "
            f"bytes again (calibrated on the same held-out images). onnxruntime alone loads it; run from the folder "
            f"holding `{name}`, this gives the int8 top-1 above ({_pct(q['int8_acc'])}) on the test images:", "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            "from PIL import Image",
            *_preprocessing(norm, res, augment),
            f"logits = ort.InferenceSession(\"{name}\").run(None, {{\"input\": x}})[0]  # int8 inside, float32 logits",
            "```", ""]


def _split_sizes(data: dict) -> str:
    held = (data.get("holdout") or {}).get("size") or 0
    train = f"{data.get('train_size', '?')} training images" + (
        f" ({held} of them held out for selection, never trained on)" if held else "")
    return f"{train} / {data.get('val_size', '?')} test images"


def _versions() -> str:
    """The packages that trained this model, as installed where the card was written."""
    from importlib import metadata

    found = []
    for name in ("kesi_dist", "torch", "torchvision", "ray", "ffcv", "deepspeed", "onnxruntime"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    import platform

    return f"Written with Python {platform.python_version()}: " + ", ".join(found) + "."


def _preprocessing(norm: dict, res: int, augment: str = "cifar") -> list[str]:
    """The input the model was evaluated on, as code: RGB pixels on the 0-255 scale (with "imagenet"
    evaluation, the central 0.875 of the short side first), resized to the model's side, normalised with
    the prepared data's per-channel mean and std (meta.json), NCHW float32. The run's loader resizes with
    OpenCV's area filter and this with PIL's: identical pixels for an image already at that side."""
    if not norm.get("mean"):
        return [f"x = ...  # float32 [N, 3, {res}, {res}]: (RGB 0-255 - mean) / std, with mean/std from the "
                "prepared data's meta.json (0-255 scale)"]
    load = ["img = Image.open(\"image.png\").convert(\"RGB\")"]
    if augment == "imagenet":
        load += ["w, h = img.size; c = int(0.875 * min(w, h)); l, t = (w - c) // 2, (h - c) // 2  # central crop",
                 "img = img.crop((l, t, l + c, t + c))"]
    return [f"MEAN = np.array({norm['mean']}, np.float32)  # per channel, on the 0-255 pixel scale (meta.json)",
            f"STD = np.array({norm['std']}, np.float32)",
            *load,
            f"img = np.asarray(img.resize(({res}, {res})) if img.size != ({res}, {res}) else img, np.float32)  # HxWx3",
            "x = ((img - MEAN) / STD).transpose(2, 0, 1)[None]  # 1x3xHxW; stack more images for a batch"]


def _normalisation(manifest: dict) -> dict:
    """mean, std (0-255 scale) and class names of the run's prepared data, if it can be read."""
    from kesi_dist.data.loaders import read_meta
    from kesi_dist.errors import KesiError

    path = manifest.get("stages", {}).get("data", {}).get("path")
    try:
        meta = read_meta(path) if path else {}
    except (KesiError, OSError):
        return {}
    return {k: meta.get(k) for k in ("mean", "std", "class_names")}


def write_model_card(run_root: str | Path, manifest: dict, report: dict, layout: ReportLayout,
                     config_path: str | Path) -> str | Path:
    """Write `<run_root>/MODEL_CARD.md` for the student of a run; return its path.

    Args:
        run_root: the run directory (local path or storage URI).
        manifest: the run's manifest data (snapshot registry, stages).
        report: the method's report dict for that manifest; layout: how its rows read
            (`kesi_dist.report.ReportLayout`; the card describes `layout.deliverable(report)`).
        config_path: the run's resolved `config.yaml`; embedded in the card and used in the commands.

    Latency is measured here (PyTorch eager, batch 1 and 64, a few repeats) for the baseline and the
    student checkpoints found in the run; a missing checkpoint leaves its latency cells empty.
    """
    import yaml

    root = run_root if storage.is_uri(run_root) else str(run_root)
    config_path = config_path if storage.is_uri(config_path) else str(config_path)
    config_text = storage.read_text(config_path) if storage.exists(config_path) else ""
    cfg = yaml.safe_load(config_text) or {}
    res = int(cfg.get("data", {}).get("resolution", 32))
    final = layout.deliverable(report)
    names = [r["snapshot"] for r in (report.get("baseline"), report.get(final) if final else None) if r]
    lat = _latencies(root, manifest, names, res)
    path = storage.join(root, "MODEL_CARD.md")
    storage.write_text(path, _card(root, manifest, report, layout, config_text, config_path, cfg, lat,
                                   _normalisation(manifest)))
    return path if storage.is_uri(path) else Path(path)
