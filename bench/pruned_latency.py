"""CPU inference latency of a pruning chain: is the MACs reduction a measured speed-up?

    ./dev bench pruned_latency --json
    .venv/bin/python bench/pruned_latency.py --json --config configs/kesi/cifar10_resnet56_pfec.yaml --threads 2

The baseline of `--config`'s architecture gets random weights (timing does not depend on their
values), the config's prune schedule is applied `--iterations` times (PFEC: physically smaller nets),
and every model of the chain plus the student (the last snapshot's architecture, built again from its
(arch, widths) as a distilled student would be) is timed at batch 1 and batch 64 in PyTorch eager
(`torch.no_grad`, eval) and in onnxruntime (the model exported by `kesi_dist.export`, i.e. what
`kesi export --format onnx` writes, graph optimisation level `--ort-opt`). Latency is the median of
`--repeats` timed runs after `--warmup` runs; torch and onnxruntime use the same number of intra-op
threads (`--threads`). Engines and models are interleaved round by round so that load drifting on a
shared machine hits every row alike; the ratios (`macs_speedup`, `*_speedup`) are what to read.

With `--round-to N` (default 8; 0 = off) the same schedule is also run with `method.prune.round_to=N`
(every kept filter count a multiple of N) and timed in the same interleaved rounds: `aligned_rows`.
With `--latency TABLE` (from `kesi latency profile` at the same threads) every row also gets the table's
prediction at its batch, `predicted_ms`, and `prediction_error` (predicted / measured onnxruntime - 1);
and a third chain is timed, `latency_rows`: the schedule scaled to meet `--latency-ratio` of the
baseline's predicted latency (`method.prune.target`), with `--round-to`.

Prints {"rows": [{"name", "macs", "macs_speedup", "torch_b1_ms", "torch_b64_ms", "ort_b1_ms",
"ort_b64_ms", "ort_b64_speedup", "*_min_ms" (fastest run), "ort_b64_min_speedup", "ort_b64_vs_parent", ...}],
"aligned_rows": [same fields], "config", "threads", "load_avg_1min_*", ...}. `ort_b64_vs_parent` is the
speed-up over the previous model of the chain (below 1: that pruning step made the net slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 64)


def build_chain(config: str, iterations: int | None, overrides: list[str]) -> tuple[list[tuple[str, object]], int]:
    """[(name, model)] for the baseline, every snapshot and the student; and the input resolution."""
    from kesi_dist.config import load_config
    from kesi_dist.methods.kesi.prune import prune_iteration, resolve_prune
    from kesi_dist.models import build_model
    from kesi_dist.plan import random_model

    cfg = load_config(config, overrides)
    p = resolve_prune(cfg)[0]  # a latency budget's scaled schedule, else the config's
    n = p.iterations if iterations is None else iterations
    model = random_model(cfg)
    chain, masks = [("baseline", model.eval())], None
    for it in range(1, n + 1):
        model, masks = prune_iteration(model, masks, p, it)
        chain.append((f"iter{it}", model.eval()))
    student = build_model(model.arch, model.num_classes, list(model.widths))
    student.load_state_dict(model.state_dict())
    chain.append(("student", student.eval()))
    return chain, cfg.data.resolution


def ort_session(path: str, threads: int, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads otherwise spin-wait after every run, stealing the CPU from whatever is timed next
    # (the other engine, the next model): with seven sessions alive that inflated torch's times ~10x.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/kesi/cifar10_resnet56_pfec.yaml", help="experiment YAML (schedule, arch)")
    ap.add_argument("--arch", default=None, help="override model.arch of the config")
    ap.add_argument("--method", default=None, choices=["pfec", "mwp"], help="override prune.method of the config")
    ap.add_argument("--iterations", type=int, default=None, help="pruning iterations (default: the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per (model, engine, batch)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    ap.add_argument("--ort-opt", default="all", choices=["disable", "basic", "extended", "all"],
                    help="onnxruntime graph optimisation level")
    ap.add_argument("--round-to", type=int, default=8, help="also time the chain with prune.round_to=N (0: off)")
    ap.add_argument("--latency", metavar="TABLE", help="kesi latency profile table: add its predictions and "
                                                     "the latency-targeted chain")
    ap.add_argument("--latency-ratio", type=float, default=0.6, help="the latency-targeted chain's budget")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from kesi_dist.export import export_model
    from kesi_dist.pruning import count_macs, count_params

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.arch:
        overrides.append(f"model.arch={args.arch}")
    if args.method:
        overrides.append(f"prune.method={args.method}")
    load_start = os.getloadavg()[0]
    chains = {"rows": build_chain(args.config, args.iterations, overrides)}
    if args.round_to:
        chains["aligned_rows"] = build_chain(args.config, args.iterations, [*overrides, f"method.prune.round_to={args.round_to}"])
    if args.latency:
        chains["latency_rows"] = build_chain(args.config, args.iterations, [
            *overrides, f"method.prune.round_to={max(1, args.round_to)}", f"method.prune.target.table={args.latency}",
            f"method.prune.target.latency_ratio={args.latency_ratio}"])
    res = chains["rows"][1]
    table = None
    if args.latency:
        from kesi_dist.latency_table import load_table

        table = load_table(args.latency)
        if table["key"]["threads"] != args.threads:
            sys.exit(f"{args.latency}: profiled with {table['key']['threads']} threads, this run times {args.threads}")
    out, runners = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (chain, _) in chains.items():
            out[kind] = []
            for name, model in chain:
                x = {b: torch.randn(b, 3, res, res, generator=torch.Generator().manual_seed(b)) for b in BATCHES}
                path = os.path.join(tmp, f"{kind}-{name}.onnx")
                with torch.no_grad():  # random weights give large logits: float32 error is relative to them
                    scale = max(1.0, float(model(x[1]).abs().max()))
                info = export_model(model, "onnx", path, sample=x[1], atol=1e-4 * scale)
                sess = ort_session(path, args.threads, args.ort_opt)
                out[kind].append({"name": name, "params": count_params(model), "macs": count_macs(model, (3, res, res)),
                                  "widths": list(model.widths), "onnx_max_abs_diff": info["max_abs_diff"],
                                  "max_abs_logit": scale})

                def torch_fn(b, m=model, x=x):
                    with torch.no_grad():
                        m(x[b])

                def ort_fn(b, s=sess, x={b: v.numpy() for b, v in x.items()}):
                    s.run(None, {"input": x[b]})

                runners.append({"torch": torch_fn, "ort": ort_fn})
        # Warm up everything first, then interleave: round r times every (model, engine, batch) once.
        for r in runners:
            for fn in r.values():
                for b in BATCHES:
                    time_ms(lambda: fn(b), args.warmup)
        samples = [{(e, b): [] for e in ("torch", "ort") for b in BATCHES} for _ in runners]
        for _ in range(args.repeats):
            for r, s in zip(runners, samples):
                for (e, b), lst in s.items():
                    lst += time_ms(lambda: r[e](b), 1)
    flat = [row for rows in out.values() for row in rows]
    for row, s in zip(flat, samples):
        for (e, b), lst in s.items():
            row[f"{e}_b{b}_ms"] = round(statistics.median(lst), 3)
            row[f"{e}_b{b}_min_ms"] = round(min(lst), 3)  # least disturbed by other jobs on a shared machine
    base = out["rows"][0]  # both chains start from the same baseline: speed-ups are relative to the paper's
    for rows in out.values():
        for i, row in enumerate(rows):
            row["macs_speedup"] = round(base["macs"] / row["macs"], 3)
            for e in ("torch", "ort"):
                for b in BATCHES:
                    row[f"{e}_b{b}_speedup"] = round(base[f"{e}_b{b}_ms"] / row[f"{e}_b{b}_ms"], 3)
            row["ort_b64_vs_macs"] = round(row["ort_b64_speedup"] / row["macs_speedup"], 3)
            row["ort_b64_min_speedup"] = round(base["ort_b64_min_ms"] / row["ort_b64_min_ms"], 3)
            parent = rows[i - 1] if 0 < i < len(rows) - 1 else None  # the student's parent is the last iteration
            if row["name"] == "student":
                parent = rows[-2]
            row["ort_b64_vs_parent"] = round(parent["ort_b64_ms"] / row["ort_b64_ms"], 3) if parent else None
            if table is not None:
                from kesi_dist.latency_table import predict

                b = table["key"]["batch"]
                row["predicted_ms"] = round(predict(table, row["widths"]), 3)
                if f"ort_b{b}_ms" in row:
                    row["prediction_error"] = round(row["predicted_ms"] / row[f"ort_b{b}_ms"] - 1, 4)
    import onnxruntime as ort

    result = {
        **out, "round_to": args.round_to, "latency_table": args.latency,
        "latency_ratio": args.latency_ratio if args.latency else None, "config": args.config, "overrides": overrides, "resolution": res, "threads": args.threads,
        "ort_opt": args.ort_opt, "repeats": args.repeats, "warmup": args.warmup,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(load_start, 2),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for kind, rows in out.items():
        print(kind)
        print(f"{'name':>10} {'MACs M':>8} {'MACs x':>7} {'torch b1':>9} {'torch b64':>10} {'ort b1':>8} {'ort b64':>9} "
              f"{'ort b64 x':>9} {'predicted':>9}")
        for r in rows:
            pred = f"{r['predicted_ms']:9.1f}" if "predicted_ms" in r else ""
            print(f"{r['name']:>10} {r['macs'] / 1e6:8.1f} {r['macs_speedup']:7.2f} {r['torch_b1_ms']:9.2f} "
                  f"{r['torch_b64_ms']:10.1f} {r['ort_b1_ms']:8.2f} {r['ort_b64_ms']:9.1f} {r['ort_b64_speedup']:9.2f} {pred}")
    print(f"load average {result['load_avg_1min_at_start']} -> {result['load_avg_1min_at_end']}")


if __name__ == "__main__":
    main()
