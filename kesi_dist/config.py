"""Experiment configuration: one pydantic object flows from the CLI to the method's recipe.

Common sections (seed, output, model, data, baseline, train, cluster) and `method:`, the section of the
method that runs (`name: kesi`, ...; a discriminated union over `kesi_dist.methods.METHODS`). Only the
CLI and a method's recipe see this object; stages and library code get flat specs (`loader_spec`, ...).

YAML is read with `yaml.safe_load`; `--set dotted.key=value` overrides are applied to the raw mapping
before validation, so an override is checked exactly like a value in the file. A key whose first part
is a section of the selected method may leave out `method.` (`--set prune.iterations=3`). Every error
names the file, the dotted key and what is allowed, and is raised as `UsageError` (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kesi_dist.errors import BadValue, UsageError
from kesi_dist.methods import METHODS
from kesi_dist.model_config import BaselineCfg, ModelCfg, resolve_model
from kesi_dist.schema import Strict

METHOD_CONFIGS = {name: m.config for name, m in METHODS.items()}

__all__ = [
    "Config", "ModelCfg", "DataCfg", "BaselineCfg", "TrainCfg", "ClusterCfg", "QuantizeCfg", "MethodCfg",
    "load_config", "parse_config", "apply_overrides", "config_to_yaml", "loader_spec",
    "engine_spec", "data_spec", "num_classes",
]

SOURCES = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic", "prepared")


class SyntheticCfg(Strict):
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(500, ge=1)
    num_classes: int = Field(10, ge=2)
    difficulty: float = Field(0.5, ge=0.0, le=1.0, description="0 = trivially separable, 1 = hard")


class DataCfg(Strict):
    source: Literal["cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic", "prepared"] = "digits"
    root: str | None = Field(None, description="raw source folder (torchvision layout); unused for digits/synthetic")
    prepared: str | None = Field(None, description="folder with train.beton, val.beton, meta.json; default <run>/data")
    resolution: int = Field(32, ge=8, le=1024, description="image side the model sees")
    store_resolution: int | None = Field(None, ge=8, description="side stored in .beton (default: source's own)")
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    loader: Literal["ffcv", "torch"] = "ffcv"
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(2, ge=0, description="loader threads/processes per training worker")
    holdout: float = Field(0.1, ge=0, description="held-out selection split carved from the training images, "
                           "per class: a fraction < 1 or a count >= 1; every choice by accuracy (branches, ASHA, "
                           "teachers, searches) is made on it and the test split is only reported; 0 = none "
                           "(selection then uses the test split, and the report says so)")
    synthetic: SyntheticCfg = SyntheticCfg()

    @field_validator("holdout")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"a fraction of each class in (0, 1) or a whole count per class, got {v}")
        return int(v) if v >= 1 else v

    @model_validator(mode="after")
    def _root_needed(self) -> "DataCfg":
        if self.source in ("cifar10", "cifar100", "tiny-imagenet", "imagefolder") and not self.root:
            raise ValueError(f"data.root is required for source {self.source!r} (the folder torchvision would take)")
        if self.source == "prepared" and not self.prepared:
            raise ValueError("data.prepared is required for source 'prepared' (folder with train.beton, val.beton)")
        return self


class TrainCfg(Strict):
    """Where and how every training run executes (placement and engine, not hyper-parameters)."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(0, ge=0, le=2)
    num_workers: int = Field(1, ge=0, description="Ray Train workers per run; 0 = in-process, no Ray")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="fractions allowed, e.g. 0.5 to share a GPU")
    bf16: bool = Field(True, description="bf16 autocast; only takes effect on CUDA")
    channels_last: bool = Field(True, description="only takes effect on CUDA")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")


class ClusterCfg(Strict):
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS, else a local Ray")


class QuantizeCfg(Strict):
    """The optional last stage of any method's run: an int8 ONNX model of the deliverable."""

    enabled: bool = Field(False, description="quantize the run's deliverable to int8 at the end (onnxruntime static "
                          "quantization, QDQ, per-channel 7-bit int8 weights, uint8 activations) into <run>/int8/, "
                          "calibrated on held-out training images (needs data.holdout > 0), never the test split; "
                          "its test top-1 and onnxruntime latency (the latency stage's batch and threads, else batch "
                          "64, 2 threads) go next to the fp32 model's in report.md, report.json and MODEL_CARD.md")
    calibration_images: int = Field(256, ge=1, description="held-out images the activation ranges are calibrated on "
                                    "(all of them when the holdout has fewer)")
    calibration: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="onnxruntime's calibrator: minmax (the observed range), percentile (the 99.999th "
        "percentile of |x|), entropy (the KL-divergence threshold; slower)")


# One entry per method; with a single method pydantic takes the plain model and still checks `name`.
MethodCfg = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]


class Config(Strict):
    """A whole experiment."""

    seed: int = 0
    output: str | None = Field(None, description="run directory or storage URI; --output overrides")
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    baseline: BaselineCfg = BaselineCfg()
    train: TrainCfg = TrainCfg()
    cluster: ClusterCfg = ClusterCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    method: MethodCfg = Field(default_factory=METHOD_CONFIGS["kesi"],
                              description="the compression method and its own sections")

    @model_validator(mode="after")
    def _model_fits(self) -> "Config":
        resolve_model(self)  # model.resolution from the data's; a torchvision/timm network the graph cannot cut
        return self

    @model_validator(mode="after")
    def _calibration_is_held_out(self) -> "Config":
        if self.quantize.enabled and not self.data.holdout:
            raise ValueError("quantize.enabled: int8 calibration reads held-out training images only, and "
                             "data.holdout is 0 (the test split is never calibrated on); set data.holdout, e.g. 0.1")
        return self


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists (`3`, `0.1`, `[1, 2]`, `true`), read with safe_load."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _method_name(raw: dict, overrides: list[str]) -> str:
    for item in overrides:
        if item.partition("=")[0].strip() == "method.name":
            return str(_parse_value(item.partition("=")[2]))
    method = raw.get("method")
    return str(method.get("name", "kesi")) if isinstance(method, dict) else "kesi"


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `dotted.key=value` overrides to a raw mapping (in place) and return it."""
    sections = METHOD_CONFIGS.get(_method_name(raw, overrides))
    own = set(sections.model_fields) - {"name"} if sections else set()
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"{source} {item!r}: expected dotted.key=value, e.g. prune.iterations=3")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] in own and parts[0] not in Config.model_fields:
            parts = ["method", *parts]  # a section of the selected method: `method.` may be left out
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"{source} {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _model_at(parts: list[str]):
    """The config model class that holds the key at `parts` (pydantic's loc, union tag included)."""
    from pydantic import BaseModel

    model: type = Config
    for part in parts[:-1]:
        if model is Config and part == "method":
            continue  # the next part is the union's tag
        if part in METHOD_CONFIGS and model is Config:
            model = METHOD_CONFIGS[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _one_error(error: dict, method: str = "kesi") -> str:
    raw_parts = [str(p) for p in error["loc"]]
    parts = list(raw_parts)
    if len(parts) > 1 and parts[0] == "method" and parts[1] in METHOD_CONFIGS:
        parts.pop(1)  # pydantic puts the union's tag in the location; the user never wrote it
    loc = ".".join(parts)
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    inner = parts[1:] if len(parts) == 2 and parts[0] == "method" else parts if len(parts) == 1 else []
    owners = [n for n, c in METHOD_CONFIGS.items() if inner and inner[0] in c.model_fields]
    if error["type"] == "extra_forbidden" and owners and method in METHOD_CONFIGS and method not in owners:
        msg = (f"a key of method{'s' * (len(owners) > 1)} {' and '.join(owners)}, not of {method} (this config's "
               f"method.name); remove it "
               f"(`kesi config --describe --set method.name={method}` lists {method}'s keys)")
    elif error["type"] == "extra_forbidden" and len(parts) == 1 and owners:
        msg = (f"a section of method {method}: move it under `method:` (method: {{name: {method}, "
               f"{parts[0]}: ...}})")
    elif error["type"] == "extra_forbidden":
        import difflib

        holder = _model_at(raw_parts)
        close = difflib.get_close_matches(parts[-1], list(getattr(holder, "model_fields", {})), n=1)
        hint = f"did you mean {'.'.join(parts[:-1] + close)}? " if close else ""
        msg = f"unknown key ({hint}check the spelling; `kesi config --describe` lists every key)"
    elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = "method.name"
        msg = f"choose one of {', '.join(METHOD_CONFIGS)}" + (f", got {error['input'].get('name')!r}"
                                                            if error["type"] == "union_tag_invalid" else "")
    elif error["type"] == "literal_error":
        msg = f"{msg}, got {error.get('input')!r}"
    elif "input" in error and error["type"] not in ("value_error", "missing") and not isinstance(error["input"], dict):
        msg = f"{msg}, got {error['input']!r}"
    return f"{loc}: {msg}" if loc else msg


def _format_error(origin: str, err: ValidationError, method: str = "kesi") -> str:
    """Every problem pydantic found, in one line: "<file>: key: what; other.key: what"."""
    return f"{origin}: " + "; ".join(dict.fromkeys(_one_error(e, method) for e in err.errors()))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or defaults when `path` is None), apply overrides, validate."""
    origin = str(path) if path else "<defaults>"
    raw: Any = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{origin}: no such config file")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{origin}: not a text file (byte {e.object[e.start]:#04x} at offset {e.start} is not "
                             "UTF-8); give a YAML config such as configs/kesi/quickstart.yaml") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise UsageError(f"{origin}: malformed YAML{where}: {problem}") from None
        if raw is None:  # empty, or only comments: running every default without a word would surprise
            raise UsageError(f"{origin}: empty config (no sections); start from one in configs/ (each opens with "
                             "its launch command)")
        if not isinstance(raw, dict):
            raise UsageError(f"{origin}: expected a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    return parse_config(raw, origin)


def parse_config(raw: dict, origin: str = "<config>") -> Config:
    """Validate a raw mapping (YAML already read, overrides applied) into a Config; errors name `origin`."""
    if isinstance(raw.get("method"), dict):
        raw["method"].setdefault("name", "kesi")  # as when the section is left out
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        method = raw["method"].get("name") if isinstance(raw.get("method"), dict) else "kesi"
        raise UsageError(_format_error(origin, e, str(method))) from None
    try:
        cfg.method.check(cfg)  # what only shows next to the model: unit names, stages per arch
    except BadValue as e:
        raise UsageError(f"{origin}: {cfg.method.ARG_KEYS.get(e.arg, e.arg)}: {e.what}") from None
    except UsageError as e:
        raise UsageError(f"{origin}: {e}") from None
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved config, as saved into a run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# the common sections as the flat specs stages and workers take

def data_spec(cfg: Config):
    from kesi_dist.data.prepare import DataSpec

    d = cfg.data
    return DataSpec(source=d.source, root=d.root, prepared=d.prepared, store_resolution=d.store_resolution,
                    seed=cfg.seed, options=d.synthetic.model_dump() if d.source == "synthetic" else {})


def loader_spec(cfg: Config, data_dir: str | Path):
    from kesi_dist.train.spec import LoaderSpec

    d = cfg.data
    return LoaderSpec(data_dir=str(data_dir), batch_size=d.batch_size, resolution=d.resolution,
                      augment=d.augment, backend=d.loader, num_workers=d.num_workers, holdout=d.holdout,
                      holdout_seed=cfg.seed)


def engine_spec(cfg: Config):
    from kesi_dist.train.spec import EngineSpec

    t = cfg.train
    return EngineSpec(engine=t.engine, zero_stage=t.zero_stage, num_workers=t.num_workers,
                      cpus_per_worker=t.cpus_per_worker, gpus_per_worker=t.gpus_per_worker, bf16=t.bf16,
                      channels_last=t.channels_last, max_failures=t.max_failures)


def num_classes(cfg: Config, meta: dict) -> int:
    """The model's classes: the data's (`meta.json`), which `model.num_classes` may only confirm."""
    n = cfg.model.num_classes or int(meta["num_classes"])
    if n != meta["num_classes"]:
        raise UsageError(f"model.num_classes is {n} but the data has {meta['num_classes']} classes; remove "
                         "model.num_classes or fix it")
    return n
