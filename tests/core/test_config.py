"""Config schema: defaults, overrides, paper configs, and one-line errors for bad input."""

from pathlib import Path

import pytest
import yaml

from kesi_dist.cli import main
from kesi_dist.config import Config, config_to_yaml, load_config
from kesi_dist.errors import UsageError
from kesi_dist.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.method.prune.method == "pfec"
    assert cfg.method.retrain.schedule == "onecycle" and cfg.method.retrain.lr == 0.1
    assert cfg.method.fixed_lr.enabled and cfg.method.fixed_lr.lr == 0.001
    assert cfg.method.distill.temperature == 5.0 and cfg.method.distill.optimizer == "adam"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    # The saved resolved config round-trips to the same object.
    assert Config.model_validate(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_paper_configs_carry_the_papers_schedules():
    r56 = load_config(ROOT / "configs/kesi/cifar10_resnet56_pfec.yaml")
    assert r56.method.prune.stage_ratios == [0.1, 0.2, 0.3]
    assert r56.method.prune.skip == ["layer1.7", "layer2.0", "layer3.0", "layer3.8"]
    assert (r56.baseline.epochs, r56.baseline.milestones) == (300, [150, 225])
    assert (r56.method.retrain.epochs, r56.method.retrain.lr, r56.method.retrain.div_factor, r56.method.retrain.pct_start,
            r56.method.retrain.final_div_factor) == (40, 0.1, 10, 0.1, 100)
    mwp = load_config(ROOT / "configs/kesi/cifar10_vgg16_mwp.yaml")
    assert mwp.method.prune.targets == [0.20, 0.40, 0.60, 0.80, 0.95]
    wrn = load_config(ROOT / "configs/kesi/cifar10_wrn16_8_pfec.yaml")
    assert (wrn.baseline.weight_decay, wrn.baseline.gamma) == (5e-4, 0.2)


def test_overrides_apply_and_are_validated():
    cfg = load_config(ROOT / "configs/kesi/cifar10_resnet56_pfec.yaml",
                      ["prune.iterations=3", "data.source=cifar100", "tune.space.lr=[0.2, 0.1]"])
    assert cfg.method.prune.iterations == 3 and cfg.data.source == "cifar100"
    assert cfg.method.tune.space["lr"] == [0.2, 0.1]
    with pytest.raises(UsageError, match=r"method\.prune\.iterations"):
        load_config(None, ["prune.iterations=zero"])
    # `method.` may be left out of a key whose first part is a section of the selected method
    assert load_config(None, ["method.prune.iterations=4"]).method.prune.iterations == 4


def _m(text: str) -> str:
    """A method section: `text` (KESI's sections) nested under `method:`."""
    return "method:\n" + "".join(f"  {line}\n" for line in text.splitlines())


BAD = [
    # (yaml text or None, overrides, expected fragments of the one-line message)
    (_m("prune:\n  stage_ratios: [0.1, 1.5]"), [], ["method.prune.stage_ratios", "must be in [0, 1), got 1.5"]),
    (_m("prune:\n  ratio: 0.5"), [], ["method.prune.ratio", "unknown key"]),
    ("model:\n  arch: resnet57\n", [], ["model.arch", "unknown model 'resnet57'", "resnet56"]),
    (_m("prune:\n  method: lottery"), [], ["method.prune.method", "'pfec' or 'mwp'", "got 'lottery'"]),
    ("data:\n  batch_size: many\n", [], ["data.batch_size", "integer", "got 'many'"]),
    ("model: [1, 2\n", [], ["malformed YAML", "line"]),
    ("- just\n- a list\n", [], ["expected a mapping"]),
    ("data:\n  source: cifar10\n", [], ["data.root is required"]),
    (_m("prune:\n  method: mwp\n  iterations: 3\n  targets: [0.2]"), [], ["prune.targets has 1 values"]),
    (_m("prune:\n  targets: [0.5, 0.2]"), [], ["method.prune.targets", "non-decreasing"]),
    (_m("tune:\n  space:\n    momentum: [0.9]"), [], ["method.tune.space", "unknown search key 'momentum'"]),
    ("seed: 0\n", ["prune.iterations"], ["--set 'prune.iterations'", "dotted.key=value"]),
    ("seed: 0\n", ["prune.nope=1"], ["method.prune.nope", "unknown key"]),
    ("seed: 3\n", ["seed.x=1"], ["seed", "not a section"]),
    # A method section at the top level (the layout before methods were units) says where it goes now.
    ("prune:\n  iterations: 3\n", [], ["prune: a section of method kesi", "move it under `method:`"]),
    ("method:\n  name: lottery\n", [], [f"method.name: choose one of {', '.join(METHODS)}, got 'lottery'"]),
    # Visible only next to the model: names and stage counts of the architecture.
    (_m("prune:\n  skip: [layer9.9]"), [], ["method.prune.skip", "'layer9.9' matches no prunable unit"]),
    ("model:\n  arch: resnet20\n", ["prune.stage_ratios=[0.1, 0.1]"],
     ["method.prune.stage_ratios", "the model has 3 stages, got 2 values"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_is_a_one_line_error_naming_the_culprit(tmp_path, text, overrides, fragments, capsys):
    # In-process `kesi config` (the CLI's main, as the console script calls it); a fresh `kesi`
    # process per bad input is tests/e2e/test_bad_input.py::test_bad_input_real_command.
    path = tmp_path / "x.yaml"
    path.write_text(text)
    args = ["config", str(path)]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    out = capsys.readouterr()
    assert code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err  # no traceback
    assert lines[0].startswith(f"error: {path}") or lines[0].startswith("error: --set"), lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    assert out.out == ""


def test_missing_config_file(tmp_path, capsys):
    # In-process, as the bad configs above (a fresh kesi process: test_bad_input_real_command).
    code = main(["config", str(tmp_path / "nope.yaml")])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err.strip() == f"error: {tmp_path / 'nope.yaml'}: no such config file"


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UsageError, match="malformed YAML"):
        load_config(path)
    assert not marker.exists()


def test_model_shortcut_is_the_references_and_only_for_cifar_resnets():
    cfg = load_config(ROOT / "configs" / "kesi" / "cifar10_resnet56_pfec.yaml")
    assert cfg.model.shortcut == "avgpool" and cfg.model.options() == {"shortcut": "avgpool"}
    assert load_config(None, ["model.shortcut=slice"]).model.options() == {"shortcut": "slice"}
    with pytest.raises(UsageError, match=r"model: model.shortcut applies to the CIFAR ResNets .* vgg16"):
        load_config(None, ["model.arch=vgg16", "model.shortcut=slice"])
    with pytest.raises(UsageError, match=r"model.shortcut: .*'avgpool'"):
        load_config(None, ["model.shortcut=conv"])


def test_the_config_says_which_momentum_runs():
    """One-cycle cycles momentum, so a `momentum` next to it would be ignored: refused, naming the key."""
    import torch

    from kesi_dist.train.optim import build_optimizer, build_scheduler
    from kesi_dist.train.spec import schedule_from

    cfg = load_config(ROOT / "configs" / "kesi" / "cifar10_resnet56_pfec.yaml")
    r = cfg.method.retrain
    assert r.schedule == "onecycle" and r.momentum is None and r.momentum_cycle == (0.85, 0.95)
    assert cfg.baseline.momentum == 0.9  # multistep: a fixed momentum
    with pytest.raises(UsageError, match=r"retrain: momentum 0.9 would not be used: onecycle cycles momentum"):
        load_config(ROOT / "configs" / "kesi" / "smoke.yaml", ["retrain.momentum=0.9"])
    fixed = load_config(ROOT / "configs" / "kesi" / "smoke.yaml", ["retrain.momentum_cycle=null", "retrain.momentum=0.8"])
    assert fixed.method.retrain.momentum == 0.8

    def momenta(spec, steps=10):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], momentum=spec.momentum or max(spec.momentum_cycle))
        sched = build_scheduler(opt, schedule="onecycle", epochs=1, steps_per_epoch=steps, lr=0.1, pct_start=0.5,
                                momentum_cycle=spec.momentum_cycle)
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["momentum"])
            opt.step()
            sched.step()
        return seen

    cycling = momenta(schedule_from(r))
    assert cycling[0] == pytest.approx(0.95) and min(cycling) == pytest.approx(0.85, abs=0.01)
    assert set(momenta(schedule_from(fixed.method.retrain))) == {0.8}


def test_cli_takes_positional_overrides_and_refuses_files_that_are_not_configs(tmp_path, capsys):
    from kesi_dist import __version__
    from kesi_dist.cli import main

    smoke = str(ROOT / "configs" / "kesi" / "smoke.yaml")
    assert main(["config", smoke, "prune.iterations=3", "--set", "tune.branches=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["prune"]["iterations"] == 3 and printed["method"]["tune"]["branches"] == 1
    with pytest.raises(SystemExit):  # argparse's own error for words that are not KEY=VALUE
        main(["config", smoke, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"kesi_dist {__version__}"
    empty, binary = tmp_path / "empty.yaml", tmp_path / "binary.yaml"
    empty.write_text("# nothing but a comment\n")
    binary.write_bytes(b"model:\n  arch: \x80\x81\xfe\n")
    for path, what in ((empty, "empty config (no sections)"), (binary, "not a text file (byte 0x80 at offset 15")):
        assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {what}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_config_describe_lists_every_key_with_its_meaning(capsys):
    from kesi_dist.cli import main

    assert main(["config", str(ROOT / "configs" / "kesi" / "smoke.yaml"), "--describe", "prune.iterations=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {ln.split(":", 1)[0]: ln for ln in lines}
    assert by_key["method.prune.iterations"].startswith("method.prune.iterations: 3")
    assert "one of pfec, mwp" in by_key["method.prune.method"]
    assert "held-out selection split" in by_key["data.holdout"]
    flat = {ln.split(":", 1)[0] for ln in lines}
    assert len(flat) == len(lines) > 80  # one line per key, nothing nested left over


def test_every_config_error_at_once_with_a_suggestion_for_misspelt_keys():
    smoke = ROOT / "configs" / "kesi" / "smoke.yaml"
    with pytest.raises(UsageError) as e:
        load_config(smoke, ["prune.iteratons=3", "data.holdot=1", "data.batch_size=-3"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{smoke}: ")
    assert "method.prune.iteratons: unknown key (did you mean method.prune.iterations?" in msg
    assert "data.holdot: unknown key (did you mean data.holdout?" in msg
    assert "data.batch_size: Input should be greater than or equal to 1, got -3" in msg
