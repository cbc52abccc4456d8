"""The bad-input catalogue: every case exits 2 (usage) or 1 (runtime) with one `error:` line naming the
culprit, no traceback, and nothing saved before it damaged.

Cases run in-process through `kesi_dist.cli.main` (fast); those marked `sub` run the real `kesi`
command in a subprocess as well, for the real exit code and stderr. Every refusal of `kesi run` here,
the run folder's and its lease's included, comes before Ray starts (no case needs Ray). Besides configs,
datasets and run folders, the catalogue covers latency tables (`kesi plan --latency`, each method's
budget, `kesi latency profile`'s arguments), `kesi status` on damaged runs and `kesi export` into a
run's own files. The finished-run and resume refusals on a
real (not fabricated) run are in tests/e2e/test_pipeline.py (test_refuses_to_overwrite_a_run,
test_resume_of_a_different_config_is_refused).
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import ray  # noqa: F401 - imported at collection, so Ray's log handler never holds a closed per-test capture stream

from kesi_dist.checkpoint import save_checkpoint
from kesi_dist.cli import main
from kesi_dist.methods import METHODS
from kesi_dist.models import build_model
from tests.datafiles import write_cifar10, write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")
SMOKES = {m: str(ROOT / "configs" / m / "smoke.yaml") for m in ("kesi", "ekg", "swp")}


@dataclass
class Ctx:
    tmp: Path
    data: str  # a private copy of the session's prepared tiny dataset (4 classes, 16 px)

    @property
    def out(self) -> str:
        return str(self.tmp / "run")

    def run(self, *sets: str, config: str = SMOKE, extra: tuple[str, ...] = ()) -> list[str]:
        return ["run", config, "--output", self.out, *extra, *[a for s in sets for a in ("--set", s)]]

    def on_data(self, *sets: str, **kw) -> list[str]:
        """`kesi run` on the tiny prepared dataset (cheap: nothing reaches training in these cases)."""
        return self.run("data.source=prepared", f"data.prepared={self.data}", "data.resolution=16", *sets, **kw)

    def yaml(self, text: str) -> str:
        p = self.tmp / "bad.yaml"
        p.write_text(text)
        return str(p)

    def checkpoint(self, arch: str, classes: int) -> str:
        p = self.tmp / f"{arch}_{classes}.pt"
        save_checkpoint(p, build_model(arch, classes))
        return str(p)

    def fabricated_run(self, status: str = "running", student: bool = False) -> Path:
        """A run folder as `kesi run` leaves it (config.yaml + manifest.json, with `student` a registered
        student snapshot), without running anything."""
        from kesi_dist.config import load_config
        from kesi_dist.runs.rundir import open_run

        cfg = load_config(SMOKE, ["data.source=prepared", f"data.prepared={self.data}", "data.resolution=16"])
        _, manifest = open_run(self.out, cfg.model_dump(mode="json"), resume=False)
        manifest.finish_stage("data", path=self.data)
        if student:
            save_checkpoint(Path(self.out) / "snapshots" / "student.pt", build_model("resnet20", 4))
            manifest.add_snapshot("student", {"checkpoint": "snapshots/student.pt", "arch": "resnet20"})
        manifest.data["status"] = status
        manifest.log(f"run {status}")
        return Path(self.out)

    def edited_run(self, edit: Callable[[dict], None], file: str = "manifest.json") -> str:
        """A fabricated run whose manifest (as JSON) or other file (as text) `edit` damaged; its folder."""
        run = self.fabricated_run()
        if file == "manifest.json":
            data = json.loads((run / file).read_text())
            edit(data)
            (run / file).write_text(json.dumps(data))
        else:
            (run / file).write_text(edit(None))
        return str(run)

    def table(self, method: str = "kesi", breakage: str | None = None) -> str:
        """A latency table for `method`'s smoke network, broken one way (see test_latency_tables)."""
        from tests.core.test_latency import _linear_table
        from tests.core.test_latency_tables import _break

        from kesi_dist.config import load_config

        path = self.tmp / f"{method}-{breakage}.json"
        table = _linear_table(load_config(SMOKES[method]), path)
        if breakage:
            _break(table, breakage)
        path.write_text(json.dumps(table))
        return str(path)


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # -> argv
    code: int
    culprit: Callable[[Ctx], str] | str  # text the one error line must contain
    ray: bool = False  # reaches connect_ray (uses the session's local Ray)
    sub: bool = False  # also run as a real subprocess
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    no_output_dir: bool = True  # refused before the run folder was created
    extra_check: Callable[[Ctx], None] | None = field(default=None)


def _corrupt_jpeg(c: Ctx) -> list[str]:
    ds = write_tiny_imagenet(c.tmp / "src")
    ds.files["first_train"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return ["data", "prepare", "--source", "tiny-imagenet", "--root", str(ds.root), "--out", str(c.tmp / "prep")]


def _wrong_layout(c: Ctx) -> list[str]:
    ds = write_tiny_imagenet(c.tmp / "src")
    ds.files["wnids"].unlink()
    return ["data", "prepare", "--source", "tiny-imagenet", "--root", str(ds.root), "--out", str(c.tmp / "prep")]


def _truncated_pickle(c: Ctx) -> list[str]:
    ds = write_cifar10(c.tmp / "src", train_per_batch=4, test=4)
    data = ds.files["data_batch_2"].read_bytes()
    ds.files["data_batch_2"].write_bytes(data[: len(data) // 3])
    return ["data", "prepare", "--source", "cifar10", "--root", str(ds.root), "--out", str(c.tmp / "prep")]


class _Payload:
    """Pickles into a call of `open(marker, "w")`: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.open, (self.marker, "w"))


def _pickle_with_code(c: Ctx) -> list[str]:
    ds = write_cifar10(c.tmp / "src", train_per_batch=4, test=4)
    with open(ds.files["test_batch"], "wb") as f:
        pickle.dump({"data": _Payload(c.tmp / "pwned"), "labels": [0]}, f)
    return ["data", "prepare", "--source", "cifar10", "--root", str(ds.root), "--out", str(c.tmp / "prep")]


def _no_marker(c: Ctx) -> None:
    assert not (c.tmp / "pwned").exists(), "the pickle's code ran"


def _truncated_beton(c: Ctx) -> list[str]:
    beton = Path(c.data) / "train.beton"
    beton.write_bytes(beton.read_bytes()[:4096])
    return c.on_data()


def _disk_full(mp: pytest.MonkeyPatch) -> None:
    from kesi_dist.storage import atomic

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(atomic._Tracked, "write", full)


def _live_lease(c: Ctx) -> list[str]:
    """A run whose folder another driver (on node-7, heartbeat just now) holds."""
    run = c.fabricated_run()
    (run / "lease.json").write_text(json.dumps({"host": "node-7", "pid": 4242, "started": time.time() - 600,
                                                "heartbeat": time.time(), "token": "theirs"}))
    return c.on_data(extra=("--resume",))


def _budget(method: str, breakage: str) -> Callable[[Ctx], list[str]]:
    key = METHODS[method].latency_target

    def setup(c: Ctx) -> list[str]:
        return c.on_data(f"{key}.table={c.table(method, breakage)}", f"{key}.latency_ratio=0.5", config=SMOKES[method])
    return setup


def _profile(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["latency", "profile", SMOKE, "--output", str(c.tmp / "t.json"), *args]


def _export(where: str, fmt: str = "onnx") -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        run = c.fabricated_run(student=True)
        return ["export", str(run), "--format", fmt, "--out", str(run / where)]
    return setup


def _export_int8(*extra: str, holdout: float | None = None) -> Callable[[Ctx], list[str]]:
    """`kesi export RUN --int8` on a fabricated run (its config's data.holdout replaced by `holdout`)."""
    def setup(c: Ctx) -> list[str]:
        import yaml

        run = c.fabricated_run(student=True)
        if holdout is not None:
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["data"]["holdout"] = holdout
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        return ["export", str(run), "--int8", *extra, "--out", str(c.tmp / "student.int8.onnx")]
    return setup


def _corrupt_manifest(c: Ctx) -> list[str]:
    run = c.fabricated_run()
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[: len(text) // 2])
    return c.on_data(extra=("--resume",))


CASES = [
    # -- the config file and --set ------------------------------------------------------------
    Case("malformed_yaml", lambda c: c.run(config=c.yaml("model:\n  arch: [resnet20\n")), 2,
         lambda c: f"{c.tmp / 'bad.yaml'}: malformed YAML at line", sub=True),
    Case("yaml_not_a_mapping", lambda c: c.run(config=c.yaml("- model\n- data\n")), 2, "expected a mapping"),
    Case("config_missing", lambda c: c.run(config=str(c.tmp / "nope.yaml")), 2,
         lambda c: f"{c.tmp / 'nope.yaml'}: no such config file"),
    Case("unknown_section", lambda c: c.run(config=c.yaml("modle:\n  arch: resnet20\n")), 2, "modle: unknown key"),
    Case("unknown_key", lambda c: c.run("prune.ratio=0.5"), 2, "prune.ratio: unknown key"),
    Case("wrong_type_in_yaml", lambda c: c.run(config=c.yaml("method:\n  prune:\n    iterations: three\n")), 2,
         "method.prune.iterations"),
    Case("method_section_at_top_level", lambda c: c.run(config=c.yaml("prune:\n  iterations: 3\n")), 2,
         "prune: a section of method kesi: move it under `method:`"),
    Case("unknown_method_name", lambda c: c.run("method.name=lottery"), 2,
         f"method.name: choose one of {', '.join(METHODS)}, got 'lottery'"),
    Case("skip_names_no_unit", lambda c: c.run("prune.skip=[layer9.9]"), 2,
         "method.prune.skip: 'layer9.9' matches no prunable unit", sub=True),
    Case("wrong_type_in_set", lambda c: c.run("data.batch_size=abc"), 2, "data.batch_size"),
    Case("ratio_above_one", lambda c: c.run("prune.stage_ratios=[0.1,1.5,0.3]"), 2,
         "prune.stage_ratios: must be in [0, 1), got 1.5"),
    Case("ratio_negative", lambda c: c.run("prune.layer_ratios={layer1.0: -0.2}"), 2, "prune.layer_ratios"),
    Case("mwp_targets_decreasing", lambda c: c.run("prune.method=mwp", "prune.targets=[0.5,0.3,0.6]",
                                                   "prune.iterations=3"), 2, "prune.targets"),
    Case("unknown_model", lambda c: c.run("model.arch=resnet57"), 2, "unknown model 'resnet57'", sub=True),
    Case("unknown_pruning_method", lambda c: c.run("prune.method=snip"), 2, "method.prune.method"),
    Case("unknown_source", lambda c: c.run("data.source=imagenet21k"), 2, "data.source"),
    Case("source_without_root", lambda c: c.run("data.source=cifar10"), 2, "data.root is required"),
    Case("set_without_value", lambda c: c.run("prune.iterations"), 2, "--set 'prune.iterations'"),
    Case("set_into_a_value", lambda c: c.run("seed.x=1"), 2, "seed is not a section"),
    Case("iterations_zero", lambda c: c.run("prune.iterations=0"), 2, "prune.iterations"),
    # -- the Tune search space ------------------------------------------------------------------
    Case("tune_space_empty", lambda c: c.run("tune.space.lr=[]"), 2, "lr: needs at least one value"),
    Case("tune_more_branches_than_grid", lambda c: c.run("tune.branches=3"), 2,
         "method.tune.branches=3 but method.tune.space has only 2 grid combination(s)", sub=True),
    Case("tune_space_unknown_key", lambda c: c.run("tune.space.momentum=[0.9]"), 2, "unknown search key 'momentum'"),
    Case("tune_space_negative_lr", lambda c: c.run("tune.space.lr=[0.1,-1]"), 2, "lr: -1.0 is not > 0"),
    Case("tune_space_warmup_over_one", lambda c: c.run("tune.space.pct_start=[1.5]"), 2, "pct_start: 1.5"),
    Case("asha_grace_above_epochs", lambda c: c.run("tune.asha=true", "tune.asha_grace_epochs=5"), 2,
         "tune.asha_grace_epochs: 5 is more than the 2 epoch(s)"),
    # -- datasets ------------------------------------------------------------------------------
    Case("dataset_root_missing", lambda c: ["data", "prepare", "--source", "cifar10", "--root",
                                            str(c.tmp / "no-such-dir"), "--out", str(c.tmp / "prep")], 1,
         lambda c: str(c.tmp / "no-such-dir")),
    Case("dataset_wrong_layout", _wrong_layout, 1, "wnids.txt"),
    Case("corrupt_jpeg", _corrupt_jpeg, 1, "images/n01443537_0.JPEG: cannot decode image", sub=True),
    Case("truncated_cifar_pickle", _truncated_pickle, 1, "data_batch_2"),
    Case("cifar_pickle_with_code", _pickle_with_code, 1, "test_batch", extra_check=_no_marker),
    Case("prepare_zero_workers", lambda c: ["data", "prepare", "--source", "digits", "--out", str(c.tmp / "prep"),
                                            "--workers", "0"], 2, "--workers 0"),
    Case("prepared_folder_missing", lambda c: c.run("data.source=prepared", f"data.prepared={c.tmp / 'nodata'}"), 1,
         lambda c: str(c.tmp / "nodata" / "meta.json")),
    Case("truncated_beton", _truncated_beton, 1, lambda c: f"{c.data}/train.beton"),
    Case("num_classes_differs_from_data", lambda c: c.on_data("model.num_classes=10"), 2,
         "model.num_classes is 10 but the data has 4"),
    # -- checkpoints ---------------------------------------------------------------------------
    Case("baseline_of_another_arch", lambda c: c.on_data(f"baseline.checkpoint={c.checkpoint('resnet32', 4)}"), 2,
         "holds a resnet32, but model.arch is resnet20", sub=True),
    Case("baseline_of_another_class_count",
         lambda c: c.on_data(f"baseline.checkpoint={c.checkpoint('resnet20', 10)}"), 2,
         "has 10 classes, the data has 4"),
    Case("baseline_missing", lambda c: c.on_data(f"baseline.checkpoint={c.tmp / 'gone.pt'}"), 1,
         lambda c: f"baseline.checkpoint: {c.tmp / 'gone.pt'}: no such checkpoint file"),
    Case("baseline_truncated", lambda c: c.on_data(f"baseline.checkpoint={_truncate(c.checkpoint('resnet20', 4))}"),
         1, "truncated or corrupt"),
    # -- run folders ---------------------------------------------------------------------------
    Case("output_of_a_finished_run", lambda c: (c.fabricated_run("complete"), c.on_data())[1], 2,
         "already holds a complete run; pass --resume", no_output_dir=False, sub=True),
    Case("resume_with_another_config", lambda c: (c.fabricated_run(), c.on_data("prune.iterations=3",
                                                                                 extra=("--resume",)))[1], 2,
         "different config (changed: method.prune.iterations)", no_output_dir=False),
    Case("resume_without_a_run", lambda c: c.on_data(extra=("--resume",)), 2, "no run to resume there"),
    Case("output_is_another_folder", lambda c: ((c.tmp / "run").mkdir(), (c.tmp / "run" / "notes.txt").write_text(
        "mine"), c.on_data())[2], 2, "folder exists and is not a kesi_dist run", no_output_dir=False),
    Case("output_is_a_file", lambda c: ((c.tmp / "run").write_text("mine"), c.on_data())[1], 2,
         "folder exists and is not a kesi_dist run", no_output_dir=False),
    Case("output_cannot_be_created", lambda c: [*c.on_data()[:2], "--output", "/proc/kesi/run", *c.on_data()[4:]],
         2, "--output /proc/kesi/run: cannot create the folder", sub=True),
    Case("corrupt_manifest_on_resume", _corrupt_manifest, 1, "manifest.json: corrupt manifest", no_output_dir=False),
    Case("disk_full_while_writing", lambda c: (c.fabricated_run(), c.on_data(extra=("--resume",)))[1], 1,
         lambda c: f"{c.tmp / 'run' / 'lease.json'}: cannot write it: no space left on device",
         patch=_disk_full, no_output_dir=False),
    Case("second_driver_on_a_run", _live_lease, 2,
         "another kesi driver is running this run (pid 4242 on node-7, started ", no_output_dir=False, sub=True),
    # -- a key of another method -----------------------------------------------------------------
    Case("key_of_another_method", lambda c: c.run("method.search.step=0.2"), 2,
         "method.search: a key of methods ekg and swp, not of kesi (this config's method.name); remove it"),
    Case("section_of_another_method_at_top_level",
         lambda c: c.run(config=c.yaml("method:\n  name: ekg\nprune:\n  iterations: 3\n")), 2,
         "prune: a key of method kesi, not of ekg (this config's method.name); remove it"),
    Case("budget_key_of_another_method", lambda c: c.run("method.target_macs_ratio=0.5"), 2,
         "method.target_macs_ratio: a key of methods ekg and swp, not of kesi"),
    # -- latency tables: wherever one is read --------------------------------------------------------
    Case("latency_table_nan", lambda c: ["plan", SMOKE, "--latency", c.table("kesi", "nan")], 2,
         "latency table field pieces['layer1.0'].ms[3]: nan is not a time in ms", sub=True),
    Case("latency_table_not_a_number", lambda c: ["plan", SMOKE, "--latency", c.table("kesi", "text")], 2,
         "latency table field pieces['layer1.0'].ms[2]: 'fast' (str) is not a time in ms"),
    Case("latency_table_field_missing", lambda c: ["plan", SMOKE, "--latency", c.table("kesi", "missing")], 2,
         "latency table field full_ms: missing"),
    Case("latency_budget_kesi", _budget("kesi", "negative"), 2,
         "method.prune.target.table: ", sub=True),
    Case("latency_budget_ekg", _budget("ekg", "inf"), 2, "method.target_latency.table: "),
    Case("latency_budget_swp", _budget("swp", "mistyped_units"), 2, "latency table field units: "),
    Case("profile_batch_zero", _profile("--batch", "0"), 2, "--batch 0: must be a positive whole number", sub=True),
    Case("profile_repeats_negative", _profile("--repeats", "-3"), 2, "--repeats -3: must be a positive"),
    Case("profile_step_zero", _profile("--step", "0"), 2, "--step 0: must be a positive whole number"),
    Case("profile_threads_zero", _profile("--threads", "0"), 2, "--threads 0: must be a positive whole number"),
    Case("profile_output_unwritable", lambda c: ["latency", "profile", SMOKE, "--output", "/proc/kesi/t.json"], 2,
         "--output /proc/kesi/t.json: cannot write there"),
    Case("profile_output_is_a_folder", lambda c: ["latency", "profile", SMOKE, "--output", str(c.tmp)], 2,
         "is a folder; give a file path"),
    # -- kesi status on damaged runs ---------------------------------------------------------------
    Case("status_of_a_non_run", lambda c: ["status", str(c.tmp)], 2, "no manifest.json; give a run folder"),
    Case("status_stages_not_a_mapping", lambda c: ["status", c.edited_run(lambda m: m.update(stages=[]))], 1,
         "manifest.json: stages: [] is a list, expected a mapping", no_output_dir=False, sub=True),
    Case("status_stage_without_start", lambda c: ["status", c.edited_run(lambda m: m["stages"]["data"].pop("start"))],
         1, "manifest.json: stages.data.start: missing", no_output_dir=False),
    Case("status_event_time_mistyped",
         lambda c: ["status", c.edited_run(lambda m: m["events"][-1].update(t="yesterday"))], 1,
         "manifest.json: events[-1].t: 'yesterday' is a str, expected a number", no_output_dir=False),
    Case("status_config_not_a_mapping", lambda c: ["status", c.edited_run(lambda _: "- a\n- b\n", "config.yaml")], 1,
         "config.yaml: a list at the top level, expected a mapping", no_output_dir=False),
    Case("status_config_model_mistyped",
         lambda c: ["status", c.edited_run(lambda _: "model: resnet20\n", "config.yaml")], 1,
         "config.yaml: model: 'resnet20' is a str, expected a mapping", no_output_dir=False),
    # -- kesi export never writes into the run's own files -----------------------------------------
    Case("export_over_a_snapshot", _export("snapshots/student.pt"), 2, "is a file of run", no_output_dir=False,
         sub=True),
    Case("export_over_the_manifest", _export("manifest.json", "torchscript"), 2, "(manifest.json); an export never",
         no_output_dir=False),
    Case("export_into_a_run_subfolder", _export("train/student.onnx"), 2, "is a place of run", no_output_dir=False),
    Case("export_over_the_report", _export("report.md", "safetensors"), 2, "(report.md)", no_output_dir=False),
    # -- int8: calibrated on held-out images only, written as ONNX ---------------------------------------
    Case("quantize_without_holdout", lambda c: c.on_data("quantize.enabled=true", "data.holdout=0"), 2,
         "quantize.enabled: int8 calibration reads held-out training images only"),
    Case("export_int8_without_holdout", _export_int8(holdout=0), 2, "has no held-out split (data.holdout: 0)",
         no_output_dir=False),
    Case("export_int8_as_torchscript", _export_int8("--format", "torchscript"), 2, "--int8 --format torchscript",
         no_output_dir=False),
    Case("export_without_a_format", lambda c: ["export", str(c.fabricated_run(student=True)), "--out",
                                               str(c.tmp / "m.onnx")], 2, "--format: required", no_output_dir=False),
]


def _truncate(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def _files(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for r in roots for p in Path(r).rglob("*") if p.is_file()}


@pytest.fixture
def ctx(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (tmp_path / "work").mkdir()
    return Ctx(tmp_path / "work", str(data))


def _check_error(err: str, culprit: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert culprit in lines[0], (culprit, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, request, monkeypatch, capsys):
    if case.ray:
        request.getfixturevalue("ray_local")
    argv = case.setup(ctx)
    before = _files(ctx.tmp, Path(ctx.data))
    if case.patch:
        case.patch(monkeypatch)
    code = main(argv)
    out = capsys.readouterr()
    culprit = case.culprit(ctx) if callable(case.culprit) else case.culprit
    assert code == case.code, (code, out.err[-2000:])
    _check_error(out.err, culprit)
    assert "Traceback" not in out.out
    after = _files(ctx.tmp, Path(ctx.data))
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert not changed, f"saved files damaged: {changed}"
    if case.no_output_dir:
        assert not (ctx.tmp / "run").exists(), "a run folder was created for a refused config"
    if case.extra_check:
        case.extra_check(ctx)


SUB = [c for c in CASES if c.sub]


@pytest.mark.slow  # each a fresh `kesi` process (imports torch): the same cases run in-process in the fast part
@pytest.mark.parametrize("case", SUB, ids=[c.id for c in SUB])
def test_bad_input_real_command(case: Case, ctx: Ctx):
    """The real `kesi` process: exit code and stderr as a user sees them (no Ray is started)."""
    argv = case.setup(ctx)
    proc = subprocess.run([sys.executable, "-m", "kesi_dist.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == case.code, proc.stderr[-2000:]
    _check_error(proc.stderr, case.culprit(ctx) if callable(case.culprit) else case.culprit)
    assert "Traceback" not in proc.stdout


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {1, 2}


def test_resume_manifest_unchanged_byte_for_byte_when_refused(ctx: Ctx, capsys):
    """The finished-run refusal leaves its manifest exactly as it was (not just 'unchanged files')."""
    run = ctx.fabricated_run("complete")
    before = (run / "manifest.json").read_bytes()
    assert main(ctx.on_data()) == 2
    assert main(ctx.on_data("prune.iterations=3", extra=("--resume",))) == 2
    assert (run / "manifest.json").read_bytes() == before
    capsys.readouterr()


def test_disk_full_leaves_the_manifest_readable(ctx: Ctx, monkeypatch, capsys):
    from kesi_dist.runs.manifest import Manifest

    run = ctx.fabricated_run()
    _disk_full(monkeypatch)
    assert main(ctx.on_data(extra=("--resume",))) == 1
    monkeypatch.undo()
    m = Manifest.load(run / "manifest.json")
    assert m.is_complete("data") and json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert "no space left" in capsys.readouterr().err
