"""Every registered method, through the same doors: its config, its plan, an in-process run, a resume.

Parametrized over `kesi_dist.methods.METHODS`: a new method gets these tests by adding its entry (and
its `configs/<name>/smoke.yaml`). The run is the method's smoke config shrunk further by the entry's
`test_overrides`, on the tiny prepared dataset, with at most 2 batches per epoch, on the session's
local Ray, in this process (`kesi_dist.launch.run_method`), pruned against a latency budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kesi_dist.config import config_to_yaml, load_config, parse_config
from kesi_dist.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
NAMES = list(METHODS)
LATENCY_RATIO = 0.8


def _config(name: str, *extra: str, data: str | None = None):
    m = METHODS[name]
    sets = list(m.test_overrides) + list(extra)
    if data:
        sets += ["data.source=prepared", f"data.prepared={data}", "data.resolution=16"]
    return load_config(ROOT / m.smoke_config, sets)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_config_round_trips_and_names_its_method(name):
    m = METHODS[name]
    cfg = load_config(ROOT / m.smoke_config)
    assert cfg.method.name == name and isinstance(cfg.method, m.config)
    assert parse_config(yaml.safe_load(config_to_yaml(cfg))) == cfg  # what a run folder saves reloads the same
    launch = (ROOT / m.smoke_config).read_text().splitlines()[:3]
    assert any(line.startswith("# Launch: kesi run " + m.smoke_config) for line in launch)


@pytest.mark.parametrize("name", NAMES)
def test_plan_shrinks_the_model(name):
    from kesi_dist.plan import plan_schedule

    rows = plan_schedule(_config(name))["iterations"]
    assert rows[0]["index"] == 0 and len(rows) >= 2
    macs = [r["macs"] for r in rows]
    assert all(b <= a for a, b in zip(macs, macs[1:])) and macs[-1] < macs[0]
    assert rows[-1]["params"] <= rows[0]["params"]


@pytest.fixture(scope="module")
def latency_table(tmp_path_factory):
    """A quick profile of the smoke configs' network (every method's smoke config runs the same one)."""
    from kesi_dist.latency import profile

    archs = {load_config(ROOT / m.smoke_config).model.arch for m in METHODS.values()}
    assert len(archs) == 1, archs
    table = profile(archs.pop(), 10, 16, batch=4, threads=1, repeats=1, warmup=1)
    path = tmp_path_factory.mktemp("latency") / "table.json"
    path.write_text(json.dumps(table))
    return table, path


@pytest.fixture(scope="module", params=NAMES)
def finished_run(request, ray_local, tiny_data, latency_table, tmp_path_factory):
    """The method's run pruned against a measured-latency budget (`Method.latency_target`, 0.8 of the
    baseline's predicted latency), so the budget's path runs for every method too, and its deliverable
    quantized to int8 (`quantize.enabled`)."""
    from kesi_dist.launch import run_method

    name = request.param
    out = tmp_path_factory.mktemp(f"run_{name}") / "run"
    key = METHODS[name].latency_target
    cfg = _config(name, f"{key}.table={latency_table[1]}", f"{key}.latency_ratio={LATENCY_RATIO}",
                  "quantize.enabled=true", data=tiny_data)
    run_method(cfg, str(out), max_steps=2)
    return name, cfg, out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_in_process_run_completes_with_its_report(finished_run):
    from kesi_dist.methods import METHODS

    name, cfg, out = finished_run
    m = _manifest(out)
    assert m["status"] == "complete" and all(st["status"] == "complete" for st in m["stages"].values())
    for snap, entry in m["snapshots"].items():
        assert (out / entry["checkpoint"]).is_file(), snap
        assert entry["params"] > 0 and entry["macs"] > 0 and 0 <= entry["val_acc"] <= 1
    report = json.loads((out / "report.json").read_text())
    layout = METHODS[name].module("report").layout(cfg)
    final = layout.deliverable(report)
    assert final is not None and report[final]["macs"] < report["baseline"]["macs"]
    md = (out / "report.md").read_text()
    assert all(label in md for label, _, _ in layout.rows)
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card: ")
    assert (out / "accuracy_vs_macs.png").read_bytes()[:4] == b"\x89PNG"
    if name == "kesi":  # its test overrides choose teachers with `topk` (2 of baseline + 2 branches)
        from kesi_dist.runs import select_acc

        candidates = {n: select_acc(e) for n, e in m["snapshots"].items() if e.get("arm") in ("baseline", "onecycle")}
        assert len(candidates) == 3
        best = sorted(candidates, key=lambda n: -candidates[n])[:2]
        assert sorted(m["stages"]["ensemble"]["teachers"]) == sorted(best)


@pytest.mark.slow
def test_the_latency_budget_holds_and_the_report_gives_predicted_and_measured_latency(finished_run, latency_table):
    from kesi_dist.latency_table import predict

    name, cfg, out = finished_run
    table = latency_table[0]
    report = json.loads((out / "report.json").read_text())
    student = next(s for s in report["snapshots"] if s["name"] == "student")
    lat = report["latency"]
    assert lat["batch"] == 4 and lat["threads"] == 1 and {"baseline", "student"} <= set(lat["rows"])
    assert lat["rows"]["student"]["predicted_ms"] == pytest.approx(predict(table, student["widths"]), abs=1e-3)
    for arm in set(lat["rows"]) - {"baseline"}:  # the student and any uniform arm: the nets that were trained
        assert lat["rows"][arm]["predicted_ms"] <= LATENCY_RATIO * table["full_ms"] + 1e-3, arm
    assert lat["rows"]["baseline"]["predicted_ms"] == pytest.approx(table["full_ms"], abs=1e-3)
    # The report gives what the latency stage measured, and the speed-up it prints is baseline over row.
    assert lat["rows"] == _manifest(out)["stages"]["latency"]["rows"]
    assert all(r["measured_ms"] > 0 for r in lat["rows"].values())
    base = lat["rows"]["baseline"]["measured_ms"]
    rows = [f"| {arm} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {base / r['measured_ms']:.2f}x |"
            for arm, r in lat["rows"].items()]
    for doc, heading in (("report.md", "## Latency (onnxruntime)"), ("MODEL_CARD.md", "### Latency (onnxruntime)")):
        text = (out / doc).read_text()
        assert heading in text and all(row in text.splitlines() for row in rows), (doc, rows)
    if name == "kesi":  # the widths it trained are the ones `kesi plan` showed for the budget
        from kesi_dist.methods.kesi.prune import resolve_prune

        assert student["widths"] == resolve_prune(cfg)[1]["widths"]


@pytest.mark.slow
def test_resume_reuses_what_is_complete_and_redoes_the_stage_in_flight(finished_run, capsys):
    """Resume twice: a complete run is reused as is; a run killed while the training stage that produces
    the student was in flight redoes that stage only (and the stages after it, which never ran)."""
    from kesi_dist.launch import run_method

    name, cfg, out = finished_run
    before = _manifest(out)
    files = {p: p.stat().st_mtime_ns for p in (out / "snapshots").glob("*.pt")}
    capsys.readouterr()
    run_method(cfg, str(out), resume=True, max_steps=2)
    after = _manifest(out)
    printed = capsys.readouterr().out
    for stage, st in before["stages"].items():
        assert after["stages"][stage]["end"] == st["end"], f"{stage} was redone"
        assert f"{stage}: complete, reused" in printed
    assert {p: p.stat().st_mtime_ns for p in files} == files

    # Killed while the training stage that produced the student ran (its last epoch checkpoint written, the
    # student not yet registered): the stages after it never started, the run is not complete.
    order = list(after["stages"])
    student = after["snapshots"]["student"]
    flight = next(n for n in order if after["stages"][n]["start"] <= student["end"] <= after["stages"][n]["end"])
    killed = json.loads(json.dumps(after))
    killed["status"] = "running"
    killed["stages"][flight]["status"] = "running"
    for later in order[order.index(flight) + 1:]:
        del killed["stages"][later]
    del killed["snapshots"]["student"]
    (out / "manifest.json").write_text(json.dumps(killed))
    others = {p: t for p, t in files.items() if p.stem != "student"}
    run_method(cfg, str(out), resume=True, max_steps=2)
    again = _manifest(out)
    assert again["status"] == "complete" and all(st["status"] == "complete" for st in again["stages"].values())
    assert again["stages"][flight]["attempts"] == after["stages"][flight]["attempts"] + 1
    for stage in order[:order.index(flight)]:
        assert again["stages"][stage]["end"] == after["stages"][stage]["end"], f"{stage} was redone"
    assert set(again["snapshots"]) == set(before["snapshots"])  # re-registered, not duplicated
    assert sum(e["event"] == "snapshot student" for e in again["events"]) == 2  # the first run's, and this one
    # It went on from the student's last epoch checkpoint (all of its epochs were done), not from scratch,
    # and no other snapshot was trained again.
    assert again["snapshots"]["student"]["resumed_at"] == [cfg_epochs(cfg, name)]
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert sum(e["event"] == "resume" for e in again["events"]) == 2


def cfg_epochs(cfg, name: str) -> int:
    """Epochs of the training run that produces the method's student."""
    m = cfg.method
    return {"kesi": lambda: m.distill.epochs, "ekg": lambda: m.finetune.epochs, "swp": lambda: m.retrain.epochs}[name]()


@pytest.mark.slow
def test_kesi_export_writes_the_deliverable(finished_run, tmp_path):
    """`kesi export RUN` (the default snapshot, "student") works on every method's run, verified."""
    from kesi_dist.export import export_run

    name, cfg, out = finished_run
    info = export_run(str(out), "onnx", tmp_path / "model.onnx")
    report = json.loads((out / "report.json").read_text())
    final = METHODS[name].module("report").layout(cfg).deliverable(report)
    assert info["snapshot"] == report[final]["snapshot"] == "student" and info["max_abs_diff"] < 1e-4
    assert info["macs"] == report[final]["macs"] and (tmp_path / "model.onnx").stat().st_size > 0


@pytest.mark.slow
def test_the_deliverable_quantized_to_int8_is_reported_and_its_card_snippet_reproduces_it(finished_run, tmp_path):
    """The quantize stage of every method's run: calibrated on the holdout, timed at the latency stage's
    batch and threads; report.json, report.md and MODEL_CARD.md give it; `kesi export --int8` writes the
    same bytes; the card's int8 snippet, as printed, in a fresh process that never imports kesi_dist, gives
    the recorded int8 top-1 on every test image (PNG files of the prepared data)."""
    import re
    import subprocess
    import sys

    from PIL import Image

    from kesi_dist.cli import main as kesi
    from kesi_dist.data.beton import BetonFile

    name, cfg, out = finished_run
    m = _manifest(out)
    q = m["stages"]["quantize"]
    assert q["status"] == "complete" and q["snapshot"] == "student" and q["file"] == "int8/student.int8.onnx"
    assert (q["latency"]["batch"], q["latency"]["threads"]) == (m["stages"]["latency"]["batch"],
                                                                 m["stages"]["latency"]["threads"]) == (4, 1)
    held = m["stages"]["data"]["holdout"]
    assert q["calibration"]["split"] == "holdout" and q["calibration"]["images"] == min(256, held["size"])
    assert q["bytes"]["int8"] == (out / q["file"]).stat().st_size < q["bytes"]["fp32"]
    report = json.loads((out / "report.json").read_text())
    assert report["int8"] == {k: q[k] for k in report["int8"]}
    rows = [f"| fp32 | {100 * q['fp32_acc']:.2f} |", f"| int8 | {100 * q['int8_acc']:.2f} |"]
    for doc, heading in (("report.md", "## INT8 (onnxruntime)"), ("MODEL_CARD.md", "### INT8 (onnxruntime)")):
        text = (out / doc).read_text()
        assert heading in text and all(any(line.startswith(r) for line in text.splitlines()) for r in rows), doc

    folder = tmp_path / "card"
    folder.mkdir()
    assert kesi(["export", str(out), "--int8", "--out", str(folder / "student.int8.onnx")]) == 0
    assert (folder / "student.int8.onnx").read_bytes() == (out / q["file"]).read_bytes()
    card = (out / "MODEL_CARD.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "student.int8.onnx" in b)
    (folder / "snippet.py").write_text(snippet)
    val = BetonFile(Path(m["stages"]["data"]["path"]) / "val.beton")
    (folder / "val").mkdir()
    for i in range(len(val.labels)):
        Image.fromarray(val.image(i)).save(folder / "val" / f"{i}.png")
    (folder / "labels.json").write_text(json.dumps([int(y) for y in val.labels]))
    (folder / "score.py").write_text(
        "import json, shutil, sys\n"
        "code = compile(open('snippet.py').read(), 'MODEL_CARD.md', 'exec')\n"
        "correct = 0\n"
        "for i, y in enumerate(json.load(open('labels.json'))):\n"
        "    shutil.copy(f'val/{i}.png', 'image.png')\n"
        "    scope = {}\n"
        "    exec(code, scope)\n"
        "    correct += int(scope['logits'].argmax(1)[0] == y)\n"
        "assert 'kesi_dist' not in sys.modules\n"
        "print(correct)\n")
    proc = subprocess.run([sys.executable, "score.py"], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(val.labels) == q["test_images"]
    assert int(proc.stdout.split()[-1]) == round(q["int8_acc"] * q["test_images"])
