"""Is the int8 model faster than the fp32 one in onnxruntime, on the quickstart's student and on a larger net?

    .venv/bin/python bench/int8_speed.py --json
    .venv/bin/python bench/int8_speed.py --run runs/quickstart --json     # the quickstart run's own student
    .venv/bin/python bench/int8_speed.py --large torchvision:resnet18 --large-resolution 112 --threads 1
    .venv/bin/python bench/int8_speed.py --align 48 49 56 63 64 --json   # + a conv stack at each width

Two networks: the KESI quickstart's student (resnet20 at the widths `kesi plan configs/kesi/quickstart.yaml`
gives its last iteration, 16 px, 10 classes; with `--run`, that run's `snapshots/student.pt`) and a larger
one (`--large`, default torchvision's resnet18 at `--large-resolution` px, 1000 classes), both with random
weights (timing does not depend on their values) unless `--run`. Each is exported as `kesi export` does
and quantized as the quantize stage does (`kesi_dist.quantize.quantize_onnx`: onnxruntime static
quantization, QDQ, per-channel int8 weights, uint8 activations), calibrated here on random batches (what
is timed is the kernels, not the accuracy). Every model runs in onnxruntime at `--batch` with `--threads`
intra-op threads in the latency stage's session (`kesi_dist.latency`), after `--warmup` runs, in
`--repeats` interleaved rounds (each model once per round, so load drifting on a shared machine hits all
alike); latencies are medians (and minima).

With `--run`, also "weights": the student's top-1 on the run's held-out and test splits with 7-bit
weights (what the quantize stage writes, `reduce_range`) and with full 8-bit weights, both calibrated on
the held-out images as the stage does: what int16 saturation of the U8S8 kernels costs on this CPU.

With `--align W...`, rows for a stack of three 3x3 convs (3 -> W -> W -> W) at each width W too: the
cost of a pruned width that is not a multiple of the kernels' blocks, in fp32 and in int8.

Prints {"rows": [{"name", "arch", "resolution", "macs", "fp32_ms", "int8_ms", "speedup", "fp32_min_ms",
"int8_min_ms", "min_speedup", "fp32_bytes", "int8_bytes"}], "batch", "threads", "repeats", "onnxruntime",
"cpu", "isa", "load_avg_1min_start/end", "weights" (with --run: [{"weight_bits", "holdout_top1",
"test_top1"}] after {"fp32"})}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RandomBatches:
    """Calibration input for a timing benchmark: a few seeded random batches."""

    def __init__(self, resolution: int, batches: int = 4, batch: int = 16):
        import numpy as np

        rng = np.random.default_rng(0)
        self.data = [rng.standard_normal((batch, 3, resolution, resolution), dtype=np.float32) for _ in range(batches)]
        self.i = 0

    def get_next(self):
        if self.i == len(self.data):
            return None
        self.i += 1
        return {"input": self.data[self.i - 1]}

    def rewind(self):
        self.i = 0


def quickstart_student():
    """(model, resolution): resnet20 at the quickstart plan's last widths, random weights."""
    from kesi_dist.config import load_config
    from kesi_dist.models import build_model
    from kesi_dist.plan import plan_schedule

    cfg = load_config(ROOT / "configs" / "kesi" / "quickstart.yaml")
    widths = plan_schedule(cfg)["iterations"][-1]["widths"]
    return build_model(cfg.model.arch, 10, widths, **cfg.model.options()).eval(), cfg.data.resolution


def weight_bits(run: Path, model, res: int) -> list[dict]:
    """Top-1 of the run's student on its held-out and test splits: fp32, int8 with 7-bit and 8-bit weights."""
    import yaml

    from kesi_dist.quantize import HoldoutReader, fp32_onnx, quantize_onnx, top1

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    where = json.loads((run / "manifest.json").read_text())["stages"]["data"]["path"]
    data = {"resolution": res, "augment": cfg["data"]["augment"]}
    split = {"holdout": cfg["data"]["holdout"], "seed": cfg["seed"]}
    fp32 = fp32_onnx(model, res)
    models = [fp32] + [quantize_onnx(fp32, HoldoutReader(where, **split, **data, images=256), reduce_range=r)
                       for r in (True, False)]
    held, _ = top1(models, where, split="holdout", **split, **data)
    test, _ = top1(models, where, **data)
    return [{"weight_bits": bits, "holdout_top1": round(h, 4), "test_top1": round(t, 4)}
            for bits, h, t in zip(("fp32", 7, 8), held, test)]


def run_student(run: Path):
    """(model, resolution) of a finished run's student snapshot."""
    import yaml

    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(run / "snapshots" / "student.pt"))
    res = int(yaml.safe_load((run / "config.yaml").read_text())["data"]["resolution"])
    return model.eval(), res


def conv_stack(width: int):
    """Three 3x3 convs (3 -> width -> width -> width) with ReLUs: a unit's cost at one width."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()).eval()


def isa() -> list[str]:
    """The CPU's vector extensions that onnxruntime's int8 kernels pick between."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished KESI run: time its student instead of the plan's widths")
    ap.add_argument("--large", default="torchvision:resnet18", help="the larger network (any kesi model name)")
    ap.add_argument("--large-resolution", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (the latency stage's default)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--align", type=int, nargs="*", default=[], metavar="WIDTH",
                    help="also time a stack of 3x3 convs at these widths (e.g. 48 49 56 63 64) at --align-resolution "
                         "px: what a width that is not a multiple of the kernels' blocks costs, fp32 and int8")
    ap.add_argument("--align-resolution", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from kesi_dist.latency import ort_session
    from kesi_dist.latency_table import cpu_model
    from kesi_dist.models import build_model
    from kesi_dist.pruning import count_macs
    from kesi_dist.quantize import fp32_onnx, quantize_onnx

    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    student, res = run_student(args.run) if args.run else quickstart_student()
    nets = [("quickstart student" + (f" ({args.run})" if args.run else ""), student, res),
            (args.large, build_model(args.large, 1000, resolution=args.large_resolution).eval(), args.large_resolution)]
    ar = args.align_resolution
    nets += [(f"3x3 conv stack, width {w}", conv_stack(w), ar) for w in args.align]
    rows, runners = [], []
    for name, model, r in nets:
        fp32 = fp32_onnx(model, r)
        int8 = quantize_onnx(fp32, RandomBatches(r))
        x = torch.randn(args.batch, 3, r, r, generator=torch.Generator().manual_seed(0)).numpy()
        if hasattr(model, "arch"):
            arch, macs = model.arch, count_macs(model, (3, r, r))
        else:  # conv_stack(w): 3x3 convs 3 -> w -> w -> w at r x r px
            w = model[0].out_channels
            arch, macs = "conv_stack", r * r * 9 * (3 * w + 2 * w * w)
        row = {"name": name, "arch": arch, "resolution": r, "macs": macs, "fp32_bytes": len(fp32),
               "int8_bytes": len(int8)}
        rows.append(row)
        for kind, data in (("fp32", fp32), ("int8", int8)):
            sess = ort_session(data, args.threads)
            runners.append((row, kind, lambda s=sess, v=x: s.run(None, {"input": v})))
    for _, _, fn in runners:
        for _ in range(args.warmup):
            fn()
    samples = [[] for _ in runners]
    for _ in range(args.repeats):
        for (_, _, fn), s in zip(runners, samples):
            t = time.perf_counter()
            fn()
            s.append(1000 * (time.perf_counter() - t))
    for (row, kind, _), s in zip(runners, samples):
        row[f"{kind}_ms"] = round(statistics.median(s), 3)
        row[f"{kind}_min_ms"] = round(min(s), 3)
    for row in rows:
        row["speedup"] = round(row["fp32_ms"] / row["int8_ms"], 3)
        row["min_speedup"] = round(row["fp32_min_ms"] / row["int8_min_ms"], 3)
    weights = weight_bits(args.run, student, res) if args.run else None
    result = {"rows": rows, "weights": weights, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
              "onnxruntime": ort.__version__, "cpu": cpu_model(), "isa": isa(),
              "load_avg_1min_start": round(load_start, 2), "load_avg_1min_end": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        print(f"{r['name']} ({r['macs'] / 1e6:.1f} M MACs at {r['resolution']} px): fp32 {r['fp32_ms']} ms, int8 "
              f"{r['int8_ms']} ms (x{r['speedup']}) at batch {args.batch}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
