"""Does PFEC on a torchvision network turn its MACs reduction into a measured CPU speed-up?

    .venv/bin/python bench/graph_latency.py --json
    .venv/bin/python bench/graph_latency.py --archs torchvision:resnet50 --resolution 160 --batch 8 --repeats 9

Each network of `--archs` is built with random weights (timing does not depend on their values) and
pruned once by the project's PFEC path (`kesi_dist.pruning.pfec_prune`: L1 norms of each unit's leading
conv, every kept width a multiple of `--round-to`; stream units kept whole unless `--stream`, as
`method.prune.stream`) with one ratio for every unit, the least (bisection on `macs_function`) whose MACs
are at most `--macs-ratio` of the baseline's. Baseline and pruned network are exported to ONNX
(`kesi_dist.export`, what `kesi export --format onnx` writes) and timed in onnxruntime at `--batch` x
`--resolution` px with `--threads` intra-op threads, after `--warmup` runs, in `--repeats` interleaved
rounds (every model once per round, so load drifting on a shared machine hits them alike); latencies are
medians. Session options and timing are bench/pruned_latency.py's (`ort_session`, `time_ms`).

Prints {"rows": [{"arch", "ratio", "macs", "pruned_macs", "macs_speedup", "ort_ms", "pruned_ort_ms",
"ort_speedup", "ort_vs_macs", "*_min_ms", "widths_multiple_of", "kept_whole"}], "batch", "resolution",
"threads", "onnxruntime", "torch", "cpu", "load_avg_1min_start/end"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pruned_latency import ort_session, time_ms  # noqa: E402 - the house timing, next to this file


def prune_to(model, macs_ratio: float, round_to: int, stream: bool, res: int):
    """(ratio, the pruned copy): the least uniform PFEC ratio whose MACs are <= macs_ratio x the model's."""
    from kesi_dist.pruning import aligned_count, macs_function, pfec_prune, unit_ratios

    units, full = model.units(), [int(c) for c in model.widths]
    macs = macs_function(model, (3, res, res))
    stages = max(u.stage for u in units) + 1

    def widths(r: float) -> list[int]:
        ratios = unit_ratios(units, [r] * stages, stream=stream)
        return [aligned_count(c, c, ratios[u.name], 1, round_to) for u, c in zip(units, full)]

    budget = macs_ratio * macs(full)
    lo, hi = 0.0, 0.95  # macs(widths(lo)) > budget >= macs(widths(hi)), or hi is the most there is
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(widths(mid)) <= budget else (mid, hi)
    return hi, pfec_prune(model, [hi] * stages, round_to=round_to, stream=stream).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["torchvision:resnet50", "torchvision:mobilenet_v2"])
    ap.add_argument("--macs-ratio", type=float, default=0.5, help="the pruned network's MACs / the baseline's")
    ap.add_argument("--round-to", type=int, default=8, help="every kept width a multiple of this")
    ap.add_argument("--stream", action="store_true", help="prune stream units too (method.prune.stream: true)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ort-opt", default="all", choices=["disable", "basic", "extended", "all"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from kesi_dist.export import export_model
    from kesi_dist.latency_table import cpu_model
    from kesi_dist.models import build_model
    from kesi_dist.pruning import count_macs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start, res = os.getloadavg()[0], args.resolution
    rows, runners = [], []
    x = torch.randn(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            base = build_model(arch, 1000, resolution=res).eval()
            ratio, small = prune_to(base, args.macs_ratio, args.round_to, args.stream, res)
            row = {"arch": arch, "ratio": round(ratio, 4), "macs": count_macs(base, (3, res, res)),
                   "pruned_macs": count_macs(small, (3, res, res)), "widths_multiple_of": args.round_to,
                   "kept_whole": [] if args.stream else ["stream"]}
            row["macs_speedup"] = round(row["macs"] / row["pruned_macs"], 3)
            for tag, model in (("", base), ("pruned_", small)):
                path = os.path.join(tmp, f"{arch.replace(':', '_')}-{tag or 'base'}.onnx")
                with torch.no_grad():
                    scale = max(1.0, float(model(x[:1]).abs().max()))
                export_model(model, "onnx", path, sample=x[:1], atol=1e-3 * scale)
                sess = ort_session(path, args.threads, args.ort_opt)
                runners.append((row, tag, lambda s=sess, v=x.numpy(): s.run(None, {"input": v})))
            rows.append(row)
        for _, _, fn in runners:
            time_ms(fn, args.warmup)
        samples = [[] for _ in runners]
        for _ in range(args.repeats):
            for (_, _, fn), s in zip(runners, samples):
                s += time_ms(fn, 1)
    for (row, tag, _), s in zip(runners, samples):
        row[f"{tag}ort_ms"] = round(statistics.median(s), 2)
        row[f"{tag}ort_min_ms"] = round(min(s), 2)
    for row in rows:
        row["ort_speedup"] = round(row["ort_ms"] / row["pruned_ort_ms"], 3)
        row["ort_min_speedup"] = round(row["ort_min_ms"] / row["pruned_ort_min_ms"], 3)
        row["ort_vs_macs"] = round(row["ort_speedup"] / row["macs_speedup"], 3)
    result = {"rows": rows, "batch": args.batch, "resolution": res, "threads": args.threads,
              "repeats": args.repeats, "ort_opt": args.ort_opt, "onnxruntime": ort.__version__,
              "torch": torch.__version__, "cpu": cpu_model(), "load_avg_1min_start": round(load_start, 2),
              "load_avg_1min_end": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        print(f"{r['arch']}: ratio {r['ratio']}, MACs {r['macs'] / 1e9:.2f} -> {r['pruned_macs'] / 1e9:.2f} G "
              f"(x{r['macs_speedup']}), onnxruntime {r['ort_ms']} -> {r['pruned_ort_ms']} ms (x{r['ort_speedup']}) "
              f"at batch {args.batch}, {res} px, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
