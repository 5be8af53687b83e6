"""Typed schema of params.yaml: one loader, one validation, one error line.

Every stage calls :func:`load_config` before it touches any output. A wrong key,
a wrong type or an out-of-range value raises :class:`ConfigError` whose message
names the key path and what was expected; :func:`pipeline.cli.run_stage` turns
it into a single line on stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from pipeline.errors import ConfigError


def _no_bool_or_str(value: Any) -> Any:
    # pydantic's lax float accepts True and "0.1"; a params file should not.
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return value


Float = Annotated[float, BeforeValidator(_no_bool_or_str)]
Int = StrictInt
Bool = StrictBool
Str = StrictStr
Fraction = Annotated[Float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[Float, Field(gt=0.0)]
PosInt = Annotated[Int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data
class Renders(Section):
    """Images rendered per source digit in each split (embedded digits only)."""

    train: Annotated[Int, Field(ge=1, le=50)] = 4
    val: Annotated[Int, Field(ge=1, le=50)] = 2
    test: Annotated[Int, Field(ge=1, le=50)] = 2


class DigitStyle(Section):
    """How one cluttered-digits image is drawn (see pipeline/data/digits.py)."""

    canvas: Annotated[Int, Field(ge=16, le=128)] = 32
    digit_size: tuple[PosInt, PosInt] = (12, 16)
    rotation: Annotated[Float, Field(ge=0.0, le=180.0)] = 0.0
    contrast: tuple[Fraction, Fraction] = (0.7, 1.0)
    invert: Bool = False
    clutter: tuple[Annotated[Int, Field(ge=0)], Annotated[Int, Field(ge=0)]] = (3, 6)
    fragment: Annotated[Int, Field(ge=2, le=8)] = 4
    clutter_contrast: tuple[Fraction, Fraction] = (0.4, 0.9)
    noise: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.05

    @model_validator(mode="after")
    def _ranges(self) -> "DigitStyle":
        for name in ("digit_size", "contrast", "clutter", "clutter_contrast"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: expected [min, max] with min <= max, got [{lo}, {hi}]")
        if self.digit_size[1] > self.canvas:
            raise ValueError(
                f"digit_size: the largest digit ({self.digit_size[1]} px) must fit the canvas ({self.canvas} px)"
            )
        return self


class DatasetCfg(Section):
    """One task's data: the embedded cluttered digits or a local real data set."""

    source: Literal["digits", "cifar10", "cifar100", "imagefolder"] = "digits"
    root: Str | None = None
    download: Bool = False
    image_size: Annotated[Int, Field(ge=8, le=512)] = 32
    val_fraction: Annotated[Float, Field(gt=0.0, lt=0.5)] = 0.1
    test_fraction: Annotated[Float, Field(gt=0.0, lt=0.5)] = 0.2
    max_train: PosInt | None = None
    renders: Renders = Renders()
    style: DigitStyle = DigitStyle()

    @model_validator(mode="after")
    def _root_needed(self) -> "DatasetCfg":
        if self.source != "digits" and not self.root:
            raise ValueError(f"root: source '{self.source}' reads a local folder; set root to its path")
        return self


class DigitPools(Section):
    """Split of the 1,797 source digits into disjoint pools, shared by both tasks."""

    train: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.6
    val: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.2
    test: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.2

    @model_validator(mode="after")
    def _sum(self) -> "DigitPools":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class DataCfg(Section):
    digit_pools: DigitPools = DigitPools()
    upstream: DatasetCfg = DatasetCfg()
    downstream: DatasetCfg = DatasetCfg()


# ---------------------------------------------------------------------------- model
class ModelCfg(Section):
    """Backbone. CIFAR nets for small images, torchvision nets for ImageNet-style data."""

    arch: Literal["cifar_resnet", "cifar_mobilenetv2", "resnet18", "mobilenet_v2", "shufflenet_v2"] = (
        "cifar_resnet"
    )
    depth: Annotated[Int, Field(ge=8, le=1202)] = 14
    width: Annotated[Float, Field(gt=0.0, le=8.0)] = 1.0
    base_width: Annotated[Int, Field(ge=4, le=256)] = 16
    weights: Str | None = None

    @model_validator(mode="after")
    def _depth(self) -> "ModelCfg":
        if self.arch == "cifar_resnet" and (self.depth - 2) % 6 != 0:
            raise ValueError(f"depth: a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {self.depth}")
        return self


# ------------------------------------------------------------------------- training
class OptimizerCfg(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PosFloat = 0.1
    momentum: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: Bool = True
    weight_decay: Annotated[Float, Field(ge=0.0)] = 5e-4


class ScheduleCfg(Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: Annotated[Int, Field(ge=0)] = 0
    milestones: tuple[PosInt, ...] = ()
    gamma: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.1


class AugmentCfg(Section):
    crop_padding: Annotated[Int, Field(ge=0, le=16)] = 2
    hflip: Bool = False


class TrainCfg(Section):
    """Settings of the one training engine (pipeline/train.py), reused by every training stage."""

    epochs: Annotated[Int, Field(ge=1, le=10000)] = 10
    batch_size: Annotated[Int, Field(ge=1, le=8192)] = 64
    eval_batch_size: Annotated[Int, Field(ge=1, le=8192)] = 500
    optimizer: OptimizerCfg = OptimizerCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    augment: AugmentCfg = AugmentCfg()
    label_smoothing: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0
    threads: Annotated[Int, Field(ge=0, le=256)] = 0

    @model_validator(mode="after")
    def _schedule(self) -> "TrainCfg":
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs: must be below epochs ({self.epochs}), got {self.schedule.warmup_epochs}"
            )
        if self.schedule.name == "step" and not self.schedule.milestones:
            raise ValueError("schedule.milestones: the step schedule needs at least one milestone epoch")
        return self


# ------------------------------------------------------------------------- convert
class TemperatureCfg(Section):
    """Softmax temperature of the coefficients, annealed linearly from start to end (DY-Conv: 30 -> 1)."""

    start: PosFloat = 30.0
    end: PosFloat = 1.0
    epochs: Annotated[Int, Field(ge=0)] = 3


class DistillCfg(Section):
    """Knowledge distillation from the dense model (Hinton et al. 2015): weight * T^2 * KL."""

    weight: Annotated[Float, Field(ge=0.0)] = 1.0
    temperature: PosFloat = 4.0


Layers = Literal["auto"] | Annotated[list[Str], Field(min_length=1)]


class DynamicCfg(Section):
    """Knobs shared by DyNet and SD-Conv (pipeline/ops/dynamic_conv.py)."""

    layers: Layers = "auto"  # "auto": every 3x3 conv but the stem; or fnmatch patterns of conv names
    num_kernels: Annotated[Int, Field(ge=1, le=64)] = 4
    activation: Literal["linear", "sigmoid", "softmax"] = "softmax"
    temperature: TemperatureCfg = TemperatureCfg()
    reduction: Annotated[Int, Field(ge=1, le=64)] = 4
    noise_std: Annotated[Float, Field(ge=0.0)] = 0.01
    width: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0
    distill: DistillCfg = DistillCfg()
    train: TrainCfg = TrainCfg()


class SDConvCfg(DynamicCfg):
    """SD-Conv: learnable-threshold masks on the K kernels (pipeline/ops/sd_conv.py)."""

    granularity: Literal["layer", "kernel", "filter", "channel"] = "filter"
    threshold_init: Annotated[Float, Field(ge=0.0)] = 0.0
    init_sparsity: Annotated[Float, Field(ge=0.0, lt=1.0)] | None = None
    estimator: Literal["ste", "long_tailed"] = "long_tailed"
    reg_weight: Annotated[Float, Field(ge=0.0)] = 5e-6
    min_keep: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.01


class DynConvCfg(Section):
    """DynConv: Gumbel-gated residual blocks with a budget loss (pipeline/ops/spatial_gate.py)."""

    budget: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    gumbel_temperature: PosFloat = 1.0
    noise_off_fraction: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.2
    budget_weight: Annotated[Float, Field(ge=0.0)] = 10.0
    anneal_fraction: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.33
    open_bias: Float = 3.0
    distill: DistillCfg = DistillCfg()
    train: TrainCfg = TrainCfg()


class ConvertCfg(Section):
    dynet: DynamicCfg = DynamicCfg()
    sdconv: SDConvCfg = SDConvCfg()
    dynconv: DynConvCfg = DynConvCfg()


# -------------------------------------------------------------------------- search
class RangeCfg(Section):
    """A search interval; ``log`` samples it on a log scale (needs low > 0). low == high fixes the value."""

    low: Float
    high: Float
    log: Bool = False

    @model_validator(mode="after")
    def _order(self) -> "RangeCfg":
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class SamplerCfg(Section):
    """Optuna sampler, every argument explicit (Optuna 5 changed the defaults); seeded from ``seed``."""

    name: Literal["tpe", "nsga2", "random"] = "tpe"
    n_startup_trials: Annotated[Int, Field(ge=0)] = 5  # tpe: random trials before the model kicks in
    multivariate: Bool = True  # tpe
    constant_liar: Bool = True  # tpe: parallel workers do not pick the same point
    population_size: Annotated[Int, Field(ge=2)] = 8  # nsga2


class SearchCommon(Section):
    n_trials: Annotated[Int, Field(ge=1, le=10000)] = 10
    timeout: Annotated[Float, Field(gt=0.0)] | None = None  # seconds; no new trial starts after it
    steps: Annotated[Int, Field(ge=1)] = 25  # optimizer steps per epoch of a trial's fine-tune
    final_steps: Annotated[Int, Field(ge=1)] = 60  # steps per epoch of the chosen configuration's final fine-tune
    select_within: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.005  # best.json: cheapest trial this close to the best val acc
    sampler: SamplerCfg = SamplerCfg()
    train: TrainCfg = TrainCfg(epochs=1, schedule=ScheduleCfg(name="constant", warmup_epochs=0))


class SDConvSpaceCfg(Section):
    """SD-Conv search space: thresholds start at a per-stage target sparsity, then learn under the regulariser."""

    stage_sparsity: RangeCfg = RangeCfg(low=0.5, high=0.95)
    reg_weight: RangeCfg = RangeCfg(low=1e-5, high=1e-2, log=True)

    @model_validator(mode="after")
    def _fractions(self) -> "SDConvSpaceCfg":
        if not (0 <= self.stage_sparsity.low and self.stage_sparsity.high < 1):
            raise ValueError("stage_sparsity: must lie in [0, 1)")
        if self.reg_weight.low < 0:
            raise ValueError("reg_weight: must be >= 0")
        return self


class DynConvSpaceCfg(Section):
    """DynConv search space: network budget, per-stage offsets from it, Gumbel temperature."""

    budget: RangeCfg = RangeCfg(low=0.2, high=0.8)
    stage_offset: RangeCfg = RangeCfg(low=-0.15, high=0.15)
    gumbel_temperature: RangeCfg = RangeCfg(low=0.5, high=2.0, log=True)

    @model_validator(mode="after")
    def _fractions(self) -> "DynConvSpaceCfg":
        if not (0 < self.budget.low and self.budget.high <= 1):
            raise ValueError("budget: must lie in (0, 1]")
        if self.gumbel_temperature.low <= 0:
            raise ValueError("gumbel_temperature: must be > 0")
        return self


class SDConvSearchCfg(SearchCommon):
    space: SDConvSpaceCfg = SDConvSpaceCfg()


class DynConvSearchCfg(SearchCommon):
    space: DynConvSpaceCfg = DynConvSpaceCfg()


class SearchCfg(Section):
    # None: a journal file per method under <repo>/optuna/; or an RDB URL (postgresql://..., mysql://...) for shared use.
    storage: Str | None = None
    sdconv: SDConvSearchCfg = SDConvSearchCfg()
    dynconv: DynConvSearchCfg = DynConvSearchCfg()

    @model_validator(mode="after")
    def _storage(self) -> "SearchCfg":
        if self.storage is not None and "://" not in self.storage:
            raise ValueError(f"storage: expected an RDB URL such as postgresql://user@host/db, got {self.storage!r}")
        return self


# ------------------------------------------------------------------------ transfer
class TransferCfg(Section):
    """Fine-tuning on the downstream task (pipeline/transfer.py)."""

    protocol: Literal["finetune", "linear_probe"] = "finetune"
    use_searched: Bool = True  # sdconv/dynconv: start from the search's final model, else the converted one
    freeze_masks: Bool = True  # sdconv: kept weights stay the kept ones (the paper's transfer claim)
    train: TrainCfg = TrainCfg(epochs=4, optimizer=OptimizerCfg(lr=0.02), schedule=ScheduleCfg(warmup_epochs=0))


# ------------------------------------------------------------------------- latency
class LatencyCfg(Section):
    """Latency measurement (pipeline/latency.py, pipeline/latency_stage.py)."""

    batch_size: Annotated[Int, Field(ge=2, le=4096)] = 32  # timed besides batch 1
    threads: Annotated[list[Annotated[Int, Field(ge=0, le=256)]], Field(min_length=1)] = [1, 0]  # 0 = all cores
    iterations: Annotated[Int, Field(ge=30, le=100000)] = 30
    warmup: Annotated[Int, Field(ge=0)] = 5
    devices: Annotated[list[Literal["cpu", "cuda"]], Field(min_length=1)] = ["cpu", "cuda"]  # cuda: when present


# -------------------------------------------------------------------------- report
class ReportCfg(Section):
    samples_per_dataset: Annotated[Int, Field(ge=1, le=64)] = 16


class TrackingCfg(Section):
    experiment: Annotated[Str, Field(min_length=1)] = "dynconv-ablation"


class Config(Section):
    seed: Annotated[Int, Field(ge=0, le=2**31 - 1)] = 0
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    pretrain: TrainCfg = TrainCfg()
    convert: ConvertCfg = ConvertCfg()
    search: SearchCfg = SearchCfg()
    transfer: TransferCfg = TransferCfg()
    latency: LatencyCfg = LatencyCfg()
    report: ReportCfg = ReportCfg()
    tracking: TrackingCfg = TrackingCfg()


# --------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.2 floats such as ``1e-5`` as numbers.

    PyYAML follows YAML 1.1 and reads ``1e-5`` (no dot) as a string; ``dvc exp
    run -S`` writes exactly that form.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors(include_url=False)[0]
    # drop pydantic's union/validator tags ("literal['auto']", "function-before[...]") from the key path
    path = ".".join(str(p) for p in first["loc"] if "[" not in str(p) and not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{path}'{suffix}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None and first["type"] == "missing" else f" (got {got!r})"
    where = f"'{path}'" if path else "top level"
    return f"{source}: {where}: {msg}{shown}{suffix}"


def parse_config(raw: Any, source: str = "params.yaml") -> Config:
    """Validate an already-parsed mapping; raise ConfigError naming the key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(raw, str(path))


def to_dict(obj: BaseModel) -> dict[str, Any]:
    return obj.model_dump(mode="json")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def fingerprint(obj: Any) -> str:
    """Stable sha256 of JSON-able data (configs, cards): keys sorted, no whitespace."""
    if isinstance(obj, BaseModel):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
