"""The `kesi` command. Thin: parses arguments, loads the config, calls one function per subcommand.

User mistakes surface as `KesiError` and are printed as a single `error: ...` line with exit code 2
(usage) or 1 (runtime). A library `BadValue` that the config layer did not catch first is one line too
(exit 2; it names the argument, not the config key); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kesi_dist.errors import BadValue, Interrupted, KesiError

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/); KEY=VALUE words after it override values "
                                  "like --set (e.g. prune.iterations=3)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set prune.iterations=3 (repeatable)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *getattr(args, "sets", [])]


def _cmd_plan(args: argparse.Namespace) -> int:
    from kesi_dist.config import load_config
    from kesi_dist.plan import plan_schedule, print_plan

    cfg = load_config(args.config, _overrides(args))
    plan = plan_schedule(cfg)
    if args.latency:
        from kesi_dist.budget import network_of
        from kesi_dist.latency import check_profilable  # torch
        from kesi_dist.latency_table import load_table, plan_latency, table_warnings, warn_once

        check_profilable(cfg.model.arch, "--latency: ")
        table = load_table(args.latency)
        for warning in table_warnings(table, args.latency, **network_of(cfg)):
            warn_once(warning)
        plan = plan_latency(plan, table)
    if args.json:
        import json

        print(json.dumps(plan))
    else:
        print_plan(plan)
    return 0


def _config_and_output(args: argparse.Namespace):
    from kesi_dist.config import load_config
    from kesi_dist.errors import UsageError

    cfg = load_config(args.config, _overrides(args))
    output = args.output or cfg.output
    if not output:
        raise UsageError(f"{args.config}: no output folder; pass --output DIR or set output: in the config")
    return cfg, output


def _cmd_run(args: argparse.Namespace) -> int:
    from kesi_dist.launch import run_method

    cfg, output = _config_and_output(args)
    run_method(cfg, output, resume=args.resume, command=args.argv)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from kesi_dist.launch import train_baseline

    cfg, output = _config_and_output(args)
    train_baseline(cfg, output, resume=args.resume, command=args.argv)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from kesi_dist.config import config_to_yaml, load_config
    from kesi_dist.schema import describe

    cfg = load_config(args.config, _overrides(args))
    print(describe(cfg) if args.describe else config_to_yaml(cfg), end="")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from kesi_dist.data.prepare import prepare_dataset

    extra = {}
    if args.source == "synthetic":
        extra = dict(
            num_train=args.num_train, num_val=args.num_val, num_classes=args.num_classes,
            difficulty=args.difficulty,
        )
    meta = prepare_dataset(
        args.source, root=args.root, out=args.out, resolution=args.resolution, seed=args.seed,
        workers=args.workers, **extra
    )
    print(f"prepared {meta['train_size']} train / {meta['val_size']} val images, "
          f"{meta['num_classes']} classes, {meta['resolution']}px -> {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kesi_dist.errors import UsageError
    from kesi_dist.export import export_run

    if args.format is None and not args.int8:
        raise UsageError("--format: required (onnx, torchscript or safetensors), or --int8 for an int8 ONNX model")
    if args.int8:
        from kesi_dist.quantize import export_run_int8

        if args.format not in (None, "onnx"):
            raise UsageError(f"--int8 --format {args.format}: int8 models are written as ONNX (QDQ); use --format "
                             "onnx or leave --format out")
        info = export_run_int8(args.run, args.out, snapshot=args.snapshot)
        cal = info["calibration"]
        print(f"onnx int8: {info['path']}  ({info['snapshot']}: {info['fp32_bytes'] / 1024:.1f} KB fp32 -> "
              f"{info['bytes'] / 1024:.1f} KB)  calibrated ({cal['method']}) on {cal['images']} held-out images; "
              f"test top-1 {100 * info['int8_acc']:.2f}% int8 vs {100 * info['fp32_acc']:.2f}% fp32 on "
              f"{info['test_images']} images")
        return 0
    info = export_run(args.run, args.format, args.out, snapshot=args.snapshot)
    extra = f" + {info['widths_file']}" if info.get("widths_file") else ""
    print(f"{info['format']}: {info['path']}{extra}  ({info['snapshot']}: {info['params'] / 1e6:.3f} M params, "
          f"{info['macs'] / 1e6:.1f} M MACs)  verified on {info['verified_batch']} {info['sample']}: "
          f"max |diff| = {info['max_abs_diff']:.2g}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from kesi_dist.status import format_status, run_status

    status = run_status(args.run)
    if args.json:
        import json

        print(json.dumps(status))
    else:
        print(format_status(status))
    return 0


def _cmd_latency_profile(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from kesi_dist.config import load_config
    from kesi_dist.errors import UsageError
    from kesi_dist.latency import check_output, check_profilable, profile
    from kesi_dist.latency_table import falls_steeply, threads_text
    from kesi_dist.model_config import default_num_classes
    from kesi_dist.progress import bar
    from kesi_dist.storage.atomic import atomic_write_text

    for flag in ("batch", "repeats", "step", "threads"):  # before minutes of measuring
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be a positive whole number")
    cfg = load_config(args.config, _overrides(args))
    check_profilable(cfg.model.arch)
    check_output(args.output)
    with bar(Console(stderr=True), "profiling unit pieces", total=None, unit="pieces") as b:
        table = profile(cfg.model.arch, default_num_classes(cfg), cfg.data.resolution, batch=args.batch,
                        threads=args.threads, options=cfg.model.options(), step=args.step, repeats=args.repeats,
                        on_progress=lambda done, total: b.update(done, total))
    atomic_write_text(args.output, json.dumps(table, indent=1) + "\n")
    for r in table["remeasured"]:  # load spikes: what the table holds instead
        print(f"note: piece {r['piece']} at width {r['width']}: {r['ms_before']:.3g} ms, far above its neighbours; "
              f"{r['how']}: {r['ms']:.3g} ms", file=sys.stderr)
    for warning in falls_steeply(table, args.output):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{cfg.model.arch} at {cfg.data.resolution}px, batch {args.batch}, {threads_text(args.threads)}, "
          f"onnxruntime {table['onnxruntime']}: {len(table['pieces'])} distinct unit pieces profiled, whole network "
          f"{table['full_ms']:.2f} ms -> {args.output}")
    return 0


def _method_names() -> list[str]:
    from kesi_dist.methods import METHODS

    return list(METHODS)


def build_parser() -> argparse.ArgumentParser:
    from kesi_dist import __version__

    parser = argparse.ArgumentParser(
        prog="kesi", description="Distributed model compression on Ray: pruning whose by-products become "
                                 "teachers (methods: " + ", ".join(_method_names()) + ")."
    )
    parser.add_argument("--version", action="version", version=f"kesi_dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="preview widths, params and MACs of every step of the method's pruning")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--latency", metavar="TABLE", help="a table from `kesi latency profile`: predict each "
                                                     "iteration's latency next to its MACs")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("run", help="run the config's method end to end (method.name; default kesi)")
    _add_config_args(p)
    p.add_argument("--output", help="run directory or storage URI (s3://, gs://, file://; default: output: in "
                                    "the config)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="only the data and baseline stages: <output>/snapshots/baseline.pt "
                                     "(`kesi run --resume` on the same folder continues from it)")
    _add_config_args(p)
    p.add_argument("--output", help="run directory or storage URI (default: output: in the config)")
    p.add_argument("--resume", action="store_true", help="continue a stopped `kesi train` in --output")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a run's student (or any snapshot) to onnx, torchscript or "
                                      "safetensors, or as an int8 ONNX model (--int8)")
    p.add_argument("run", help="run directory (holds manifest.json)")
    p.add_argument("--snapshot", default="student", help="snapshot name from the manifest (default: student)")
    p.add_argument("--format", choices=["onnx", "torchscript", "safetensors"], help="required unless --int8")
    p.add_argument("--int8", action="store_true", help="an int8 ONNX model (onnxruntime static quantization, "
                                                       "per-channel), calibrated on the run's held-out images")
    p.add_argument("--out", required=True, help="file to write (safetensors also writes OUT.widths.json)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("status", help="where a run is (running or finished): stages, what trains now with its "
                                      "epoch, accuracy, node and ETA, the result once complete")
    p.add_argument("run", help="run folder or storage URI (the --output of kesi run)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("config", help="print the resolved config (every key, defaults filled in)")
    p.add_argument("config", nargs="?", help="experiment YAML; omit to print the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--describe", action="store_true", help="one line per key: value, allowed values, what it does")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("latency", help="measured latency model of a network on this machine")
    lsub = p.add_subparsers(dest="latency_command", required=True)
    p = lsub.add_parser("profile", help="time each prunable unit over a grid of widths and the whole network "
                                        "(onnxruntime, as `kesi export` writes it); writes a JSON table for "
                                        "`kesi plan --latency`")
    _add_config_args(p)
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime"])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--batch", type=int, default=64, help="batch size timed (default 64)")
    p.add_argument("--step", type=int, default=8, help="width grid: every width up to 64, then every STEP-th")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per width (median)")
    p.add_argument("--output", required=True, help="JSON table to write")
    p.set_defaults(func=_cmd_latency_profile)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("prepare", help="convert a dataset into FFCV .beton files + meta.json")
    p.add_argument("--source", required=True,
                   choices=["cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic"])
    p.add_argument("--root", help="source folder as torchvision takes it (not needed for digits/synthetic)")
    p.add_argument("--out", required=True, help="output folder or storage URI for train.beton, val.beton, meta.json")
    p.add_argument("--resolution", type=int, default=None, help="stored image side (default: the source's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=2000, help="synthetic: training images")
    p.add_argument("--num-val", type=int, default=500, help="synthetic: validation images")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: classes")
    p.add_argument("--difficulty", type=float, default=0.5, help="synthetic: 0 easy .. 1 hard")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: CPU count, at most 8)")
    p.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `kesi run x.yaml prune.iterations=3` (torchtune/Hydra habit): bare KEY=VALUE words are overrides,
    # wherever they stand among the options; anything else unknown is argparse's usual error.
    args, extra = parser.parse_known_args(argv)
    sets = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in sets]
    if unknown or (sets and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or sets)}")
    args.sets, args.argv = sets, list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except KesiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BadValue as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a run stopped by SIGINT/SIGTERM: its one line says how to resume
        print(e.message, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
