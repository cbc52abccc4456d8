"""The cluster definitions under cluster/ parse and carry what Ray's launcher and KubeRay require."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _image_name() -> str:
    """The image name the Dockerfile declares on its first line (`# image: NAME`)."""
    first = (CLUSTER / "Dockerfile").read_text().splitlines()[0]
    m = re.fullmatch(r"# image: (\S+)", first)
    assert m, f"cluster/Dockerfile must start with '# image: NAME', got {first!r}"
    return m.group(1)


def test_dockerfile_installs_ffcv_deps_and_package():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:")
    for dep in ("pkg-config", "libturbojpeg0-dev", "libopencv-dev", "g++", "ninja-build"):
        assert re.search(rf"\s{re.escape(dep)}\s", text), dep
    assert "pip install" in text and "COPY kesi_dist" in text
    # Every path the Dockerfile copies from the build context exists in the repository.
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (CLUSTER.parent / part).exists(), f"COPY {part}: not in the repository"
    assert re.fullmatch(r"[a-z0-9.\-/]+:[\w.\-]+", _image_name())


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_has_required_keys(name):
    cfg = _load(name)
    assert cfg["cluster_name"]
    provider = cfg["provider"]
    assert provider["type"] in {"aws", "gcp"}
    assert provider.get("region")
    if provider["type"] == "gcp":
        assert provider.get("project_id")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert isinstance(cfg["max_workers"], int)
    gpu_types = []
    for tname, t in types.items():
        assert isinstance(t["node_config"], dict) and t["node_config"], tname
        assert all(isinstance(v, int) for v in t["resources"].values()), tname
        if tname != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], tname
            if t["resources"].get("GPU", 0) > 0:
                gpu_types.append(tname)
    assert gpu_types, f"{name}: no GPU worker type"
    assert any(types[t]["min_workers"] >= 1 for t in gpu_types), "a GPU must exist for the resource check"
    assert cfg["docker"]["image"] == _image_name()
    # Token auth on every node: mode set for the container and the start commands, token mounted.
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_matches_rays_schema(name):
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_load(name), schema)
    broken = _load(name)
    broken["available_node_types"]["head"]["resources"]["GPU"] = 0.5  # schema wants integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_up_config_checks(name):
    """The checks `ray up` runs before it contacts the cloud: provider defaults merged, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_load(name))
    validate_config(cfg)
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 4
    assert cfg["docker"]["image"] == _image_name()


def test_launcher_howto_names_every_step():
    for name in LAUNCHER_YAMLS:
        head = (CLUSTER / name).read_text().split("\ncluster_name:")[0]
        for step in ("ray up", "ray dashboard", "ray job submit", "tensorboard", "--port-forward",
                     "report", "ray down", "auth-token"):
            assert step in head, f"{name}: how-to lacks {step!r}"


def _example_command(name: str) -> list[str]:
    """The `kesi run CONFIG --output ... [--set k=v ...]` a cluster file tells users to submit."""
    if name.endswith("rayjob.yaml"):
        text = _load(name)["spec"]["entrypoint"]
    else:
        head = (CLUSTER / name).read_text().split("\ncluster_name:")[0]
        text = head[head.index("kesi run "):]
        text = re.sub(r"\\\n#\s*", " ", text).splitlines()[0]  # join the comment's continuation lines
    words = text.split()
    return words[words.index("run") + 1:]


def _gpus_per_node_and_min_nodes(name: str) -> tuple[int, int]:
    if name.endswith("rayjob.yaml"):
        group = _load(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        return int(limits["nvidia.com/gpu"]), group["minReplicas"]
    worker = _load(name)["available_node_types"]["gpu_worker"]
    return worker["resources"]["GPU"], worker["min_workers"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS + ["kuberay-rayjob.yaml"])
def test_each_cluster_runs_its_own_example(name):
    """The config a cluster file submits fits it: one training run's GPUs (workers x GPUs per worker) are
    on one node and present from the start (the up-front resource check), and its data comes from a
    storage URI, since no cluster file mounts a shared /data."""
    from kesi_dist.config import load_config

    args = _example_command(name)
    config = (CLUSTER.parent / args[0].removeprefix("/opt/kesi/"))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(config, sets)
    per_run = max(cfg.train.num_workers, 1) * cfg.train.gpus_per_worker
    per_node, min_nodes = _gpus_per_node_and_min_nodes(name)
    assert 0 < per_run <= per_node, (name, per_run, per_node)
    assert per_run <= per_node * min_nodes, f"{name}: the cluster starts with fewer GPUs than one run needs"
    assert cfg.data.source == "prepared" and re.match(r"(s3|gs)://", cfg.data.prepared), cfg.data.prepared
    output = args[args.index("--output") + 1]
    assert re.match(r"(s3|gs)://", output), output
    if name.endswith("rayjob.yaml"):
        spec = _load(name)["spec"]["rayClusterSpec"]
        assert spec["enableInTreeAutoscaling"] is True  # min/max replicas need the autoscaler to mean anything
    else:
        amis = re.findall(r"ImageId: (\S+)", (CLUSTER / name).read_text())
        assert "latest_dlami" not in amis  # Ray's alias: a CUDA 11 image, older than the image's CUDA 12.8


def test_dockerfile_python_and_ray_match_the_dev_setup():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "python3.11 -m venv" in text  # ./dev's Python (3.11): Ray needs the same minor everywhere
    tested = __import__("ray").__version__
    assert f'"ray[default,train,tune]=={tested}"' in text
    assert '".[dev]"' not in text  # no test extras in the image
    for name in LAUNCHER_YAMLS:
        assert f'"ray[default]=={tested}"' in (CLUSTER / name).read_text()
    assert _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == tested


def test_kuberay_rayjob_required_fields():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert re.match(r"kesi run \S+\.yaml --output \S+", spec["entrypoint"])
    config_path = spec["entrypoint"].split()[2]
    assert (CLUSTER.parent / config_path.removeprefix("/opt/kesi/")).is_file(), config_path
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"]["mode"] == "token"
    head = rc["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are strings"
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    assert rc["workerGroupSpecs"]
    for group in rc["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["replicas"], int)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        containers = group["template"]["spec"]["containers"]
        images += [c["image"] for c in containers]
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for c in containers), group["groupName"]
    assert set(images) == {_image_name()}


def test_runtime_env_is_valid_and_excludes_heavy_paths(tmp_path):
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**env)

    # The commented pip section is valid once uncommented.
    text = (CLUSTER / "runtime_env.yaml").read_text()
    block = re.search(r"^# pip:\n((?:#   .*\n)+)", text, re.M)
    assert block, "runtime_env.yaml: commented pip section missing"
    pip = yaml.safe_load("pip:\n" + re.sub(r"^# ", "", block.group(1), flags=re.M))["pip"]
    assert any(p.startswith("ffcv") for p in pip["packages"])
    RuntimeEnv(pip=pip)

    # Zip a working dir the way `ray job submit` does, with these excludes.
    from ray._private.runtime_env.packaging import _zip_files

    src = tmp_path / "repo"
    for rel in ("kesi_dist/cli.py", "kesi_dist/data/loaders.py", "configs/a.yaml", ".venv/bin/python", ".git/HEAD",
                "runs/qs/manifest.json", "data/train.beton", "cache/val.beton", "x.egg-info/PKG-INFO",
                "kesi_dist/data/__pycache__/loaders.cpython-311.pyc"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    out = tmp_path / "pkg.zip"
    _zip_files(str(src), env["excludes"], str(out), include_gitignore=False)
    names = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    # The repo's data/ and runs/ go, the kesi_dist/data package stays (anchored patterns).
    assert names == {"kesi_dist/cli.py", "kesi_dist/data/loaders.py", "configs/a.yaml"}


def test_local_cluster_script_usage_errors(tmp_path):
    import subprocess

    script = CLUSTER / "local-cluster.sh"
    r = subprocess.run([str(script), "bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = subprocess.run([str(script), "up", "--workers", "zero", "--dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--workers" in r.stderr
    r = subprocess.run([str(script), "up", "--dir", str(tmp_path / ("d" * 60))],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "too long" in r.stderr
    r = subprocess.run([str(script), "status", "--dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not running" in r.stdout
    r = subprocess.run([str(script), "down", "--dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "nothing to stop" in r.stderr
