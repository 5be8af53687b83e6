"""Typed schema of params.yaml: one loader, one validation, one error line.

params.yaml is the only home of every value a result depends on: no field of
this schema has a default, so a key missing from params.yaml is an error
naming it, never a silently different experiment. Groups whose keys depend on
a choice are tagged unions (``data.<task>.source``, ``model.arch``,
``optimizer.name``, ``schedule.name``, ``sampler.name``): each choice asks for
exactly the keys it uses.

Method groups (``convert.<method>`` and ``search.<method>``) are validated by
the schema their method module declares (:mod:`pipeline.methods`); here they
are kept as mappings, so that loading params does not import every method.
The ``validate`` stage checks both before any other stage runs.

A wrong key, a wrong type or an out-of-range value raises
:class:`ConfigError` whose message names the key path and what was expected;
:func:`pipeline.cli.run_stage` turns it into a single line on stderr and exit
status 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

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
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from pipeline.redact import has_password, redact


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

# Tag values of the unions below: pydantic puts the chosen tag into an error's
# key path, which the error line leaves out.
_UNION_TAGS: set[str] = set()


def _tagged(*choices: type[BaseModel], tag: str) -> Any:
    for choice in choices:
        _UNION_TAGS.update(choice.model_fields[tag].annotation.__args__)  # type: ignore[union-attr]
    return Annotated[Union[choices], Field(discriminator=tag)]  # type: ignore[valid-type]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data
class Renders(Section):
    """Images rendered per source digit in each split (embedded digits only)."""

    train: Annotated[Int, Field(ge=1, le=50)]
    val: Annotated[Int, Field(ge=1, le=50)]
    test: Annotated[Int, Field(ge=1, le=50)]


class DigitStyle(Section):
    """How one cluttered-digits image is drawn (see pipeline/data/digits.py)."""

    canvas: Annotated[Int, Field(ge=16, le=128)]
    digit_size: tuple[PosInt, PosInt]
    rotation: Annotated[Float, Field(ge=0.0, le=180.0)]
    contrast: tuple[Fraction, Fraction]
    invert: Bool
    clutter: tuple[Annotated[Int, Field(ge=0)], Annotated[Int, Field(ge=0)]]
    fragment: Annotated[Int, Field(ge=2, le=8)]
    clutter_contrast: tuple[Fraction, Fraction]
    noise: Annotated[Float, Field(ge=0.0, le=1.0)]

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


class DigitsData(Section):
    """The embedded cluttered digits (no download): rendered from scikit-learn's handwritten digits."""

    source: Literal["digits"]
    max_train: PosInt | None  # keep at most this many training images (seeded, stratified); null: all
    renders: Renders
    style: DigitStyle


class CifarData(Section):
    """CIFAR-10/100 (the python version) from a local folder; validation carved from the official train set."""

    source: Literal["cifar10", "cifar100"]
    root: Annotated[Str, Field(min_length=1)]
    download: Bool
    val_fraction: Annotated[Float, Field(gt=0.0, lt=0.5)]
    max_train: PosInt | None


class SplitFolders(Section):
    """The folder under ``root`` each split is read from (ImageNet: test from ``val``, validation carved from
    train). A val or test folder that is null or absent is carved from train (seeded, stratified); without a
    train folder the whole tree (``root/<class>/*``) is train."""

    train: Annotated[Str, Field(min_length=1)]
    val: Annotated[Str, Field(min_length=1)] | None
    test: Annotated[Str, Field(min_length=1)] | None

    @model_validator(mode="after")
    def _distinct(self) -> "SplitFolders":
        named = [f for f in (self.train, self.val, self.test) if f is not None]
        if len(set(named)) < len(named):
            raise ValueError(f"two splits read the same folder: {named}")
        return self


class ImageFolderData(Section):
    """``<class>/*.jpg`` or ``train|val|test/<class>/*`` trees, resized and centre-cropped to ``image_size``."""

    source: Literal["imagefolder"]
    root: Annotated[Str, Field(min_length=1)]
    image_size: Annotated[Int, Field(ge=8, le=512)]
    crop_ratio: Annotated[Float, Field(gt=0.0, le=1.0)]  # shorter side resized to image_size / crop_ratio, centre crop
    stream: Bool  # false: decoded once into arrays by prepare; true: listed by prepare, decoded per batch
    decode_threads: Annotated[Int, Field(ge=1, le=256)]  # threads decoding a batch
    stats_images: PosInt  # normalisation mean/std measured on at most this many train images (seeded sample)
    folders: SplitFolders
    val_fraction: Annotated[Float, Field(gt=0.0, lt=0.5)]
    test_fraction: Annotated[Float, Field(gt=0.0, lt=0.5)]
    max_train: PosInt | None


DatasetCfg = _tagged(DigitsData, CifarData, ImageFolderData, tag="source")


class DigitPools(Section):
    """Split of the 1,797 source digits into disjoint pools, shared by both tasks."""

    train: Annotated[Float, Field(gt=0.0, lt=1.0)]
    val: Annotated[Float, Field(gt=0.0, lt=1.0)]
    test: Annotated[Float, Field(gt=0.0, lt=1.0)]

    @model_validator(mode="after")
    def _sum(self) -> "DigitPools":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class DataCfg(Section):
    seed: Annotated[Int, Field(ge=0, le=2**31 - 1)]  # the data seed: pools, rendering, splits (train_seed is separate)
    digit_pools: DigitPools
    upstream: DatasetCfg
    downstream: DatasetCfg


# ---------------------------------------------------------------------------- model
class CifarResNetCfg(Section):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): depth 6n+2, three stages."""

    arch: Literal["cifar_resnet"]
    depth: Annotated[Int, Field(ge=8, le=1202)]
    width: Annotated[Float, Field(gt=0.0, le=8.0)]  # channel multiplier
    base_width: Annotated[Int, Field(ge=4, le=256)]  # channels of the first stage at width 1

    @model_validator(mode="after")
    def _depth(self) -> "CifarResNetCfg":
        if (self.depth - 2) % 6 != 0:
            raise ValueError(f"depth: a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {self.depth}")
        return self


class CifarMobileNetV2Cfg(Section):
    """MobileNetV2 for small images (stride-1 stem)."""

    arch: Literal["cifar_mobilenetv2"]
    width: Annotated[Float, Field(gt=0.0, le=8.0)]


class TorchvisionCfg(Section):
    """torchvision's ImageNet nets, from random init or a local state-dict file (nothing is downloaded)."""

    arch: Literal["resnet18", "resnet50", "resnet101", "mobilenet_v2", "shufflenet_v2"]
    width: Annotated[Float, Field(gt=0.0, le=8.0)]  # channel multiplier (ResNets: every stage, divisible by 8; MobileNetV2: width_mult)
    weights: Str | None

    @model_validator(mode="after")
    def _width(self) -> "TorchvisionCfg":
        if self.width != 1.0 and self.arch == "shufflenet_v2":
            raise ValueError("width: shufflenet_v2 is built at width 1 only (x1.0)")
        if self.width != 1.0 and self.weights:
            raise ValueError(f"width: {self.width:g} does not fit the weights file, which holds the width-1 net")
        return self


ModelCfg = _tagged(CifarResNetCfg, CifarMobileNetV2Cfg, TorchvisionCfg, tag="arch")
NARROWABLE = (CifarResNetCfg, CifarMobileNetV2Cfg, TorchvisionCfg)  # backbones with a channel multiplier


# ------------------------------------------------------------------------- training
class SGDCfg(Section):
    name: Literal["sgd"]
    lr: PosFloat
    momentum: Annotated[Float, Field(ge=0.0, lt=1.0)]
    nesterov: Bool
    weight_decay: Annotated[Float, Field(ge=0.0)]


class AdamWCfg(Section):
    name: Literal["adamw"]
    lr: PosFloat
    betas: tuple[Annotated[Float, Field(ge=0.0, lt=1.0)], Annotated[Float, Field(ge=0.0, lt=1.0)]]
    eps: PosFloat
    weight_decay: Annotated[Float, Field(ge=0.0)]


OptimizerCfg = _tagged(SGDCfg, AdamWCfg, tag="name")


class CosineSchedule(Section):
    name: Literal["cosine"]
    warmup_epochs: Annotated[Int, Field(ge=0)]


class ConstantSchedule(Section):
    name: Literal["constant"]
    warmup_epochs: Annotated[Int, Field(ge=0)]


class StepSchedule(Section):
    name: Literal["step"]
    warmup_epochs: Annotated[Int, Field(ge=0)]
    milestones: Annotated[tuple[PosInt, ...], Field(min_length=1)]
    gamma: Annotated[Float, Field(gt=0.0, le=1.0)]


ScheduleCfg = _tagged(CosineSchedule, ConstantSchedule, StepSchedule, tag="name")


class ResizedCropCfg(Section):
    """Random-resized crop (Szegedy et al. 2015; torchvision's RandomResizedCrop): a crop of ``scale`` of the
    image's area at aspect ``ratio`` (log-uniform), resized back to the image's size."""

    scale: tuple[Annotated[Float, Field(gt=0.0, le=1.0)], Annotated[Float, Field(gt=0.0, le=1.0)]]
    ratio: tuple[PosFloat, PosFloat]

    @model_validator(mode="after")
    def _ranges(self) -> "ResizedCropCfg":
        for name in ("scale", "ratio"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: expected [min, max] with min <= max, got [{lo}, {hi}]")
        return self


class AugmentCfg(Section):
    resized_crop: ResizedCropCfg | None  # ImageNet training's crop (before padding and flip); null: none
    crop_padding: Annotated[Int, Field(ge=0, le=16)]
    hflip: Bool


class TrainCfg(Section):
    """Settings of the one training engine (pipeline/train.py), reused by every training stage."""

    epochs: Annotated[Int, Field(ge=1, le=10000)]
    batch_size: Annotated[Int, Field(ge=1, le=8192)]
    eval_batch_size: Annotated[Int, Field(ge=1, le=8192)]
    optimizer: OptimizerCfg
    schedule: ScheduleCfg
    augment: AugmentCfg
    label_smoothing: Annotated[Float, Field(ge=0.0, lt=1.0)]
    threads: Annotated[Int, Field(ge=0, le=256)]  # torch intra-op threads; 0 = all cores

    @model_validator(mode="after")
    def _schedule(self) -> "TrainCfg":
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs: must be below epochs ({self.epochs}), got {self.schedule.warmup_epochs}"
            )
        return self


# ------------------------------------------------- building blocks of method schemas
class TemperatureCfg(Section):
    """Softmax temperature, annealed linearly from ``start`` to ``end`` over ``epochs`` (DY-Conv: 30 -> 1)."""

    start: PosFloat
    end: PosFloat
    epochs: Annotated[Int, Field(ge=0)]


class DistillCfg(Section):
    """Knowledge distillation from the dense model (Hinton et al. 2015): weight * T^2 * KL."""

    weight: Annotated[Float, Field(ge=0.0)]
    temperature: PosFloat


class RangeCfg(Section):
    """A search interval; ``log`` samples it on a log scale (needs low > 0). low == high fixes the value."""

    low: Float
    high: Float
    log: Bool

    @model_validator(mode="after")
    def _order(self) -> "RangeCfg":
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class TPESamplerCfg(Section):
    """Optuna's TPE, every argument explicit (Optuna 5 changed the defaults); seeded from ``seed``."""

    name: Literal["tpe"]
    n_startup_trials: Annotated[Int, Field(ge=0)]  # random trials before the model kicks in
    multivariate: Bool
    constant_liar: Bool  # parallel workers do not pick the same point
    group: Bool  # multivariate TPE over subspaces of the parameters (Optuna's `group`)
    n_ei_candidates: Annotated[Int, Field(ge=1)]


class NSGA2SamplerCfg(Section):
    name: Literal["nsga2"]
    population_size: Annotated[Int, Field(ge=2)]


class RandomSamplerCfg(Section):
    name: Literal["random"]


SamplerCfg = _tagged(TPESamplerCfg, NSGA2SamplerCfg, RandomSamplerCfg, tag="name")


class SearchCommon(Section):
    """Keys every method's ``search.<method>`` group has; the method's schema adds its ``space``."""

    n_trials: Annotated[Int, Field(ge=1, le=10000)]  # complete trials the study ends with
    timeout: Annotated[Float, Field(gt=0.0)] | None  # seconds; no new trial starts after it
    steps: Annotated[Int, Field(ge=1)]  # optimizer steps per epoch of a trial's fine-tune
    final_steps: Annotated[Int, Field(ge=1)]  # steps per epoch of the chosen configuration's final fine-tune
    select_within: Annotated[Float, Field(ge=0.0, le=1.0)]  # best.json: cheapest trial this close to the best val acc
    sampler: SamplerCfg
    train: TrainCfg


# -------------------------------------------------------------------------- search
class OptunaCfg(Section):
    """Where the search's studies live (``optuna``), shared by every ``search.<method>`` study."""

    # null: a journal file per method under <repo>/optuna/ (or the URL in $OPTUNA_STORAGE); or an RDB URL
    # (postgresql://user@host/db) without a password: it comes from PGPASSWORD, ~/.pgpass or $OPTUNA_STORAGE.
    storage: Str | None
    # RDB storages: a running trial records a heartbeat every heartbeat_interval s; one without a heartbeat for
    # grace_period s belongs to a dead worker (any host) and is reclaimed: marked FAIL, its params run again.
    heartbeat_interval: Annotated[Int, Field(ge=1, le=3600)]
    grace_period: Annotated[Int, Field(ge=2, le=86400)]
    # RDB storages: a worker whose database went away (a restart) retries its calls for up to
    # reconnect_timeout s, then stops with one line; its running trial is reclaimed once the database is back.
    reconnect_timeout: Annotated[Int, Field(ge=1, le=86400)]

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str | None) -> str | None:
        if url is not None and "://" not in url:
            raise ValueError("expected an RDB URL such as postgresql://host:5432/optuna")
        if url is not None and has_password(url):
            raise ValueError(
                "holds a password, which params.yaml would commit to git and every run would log; keep the URL "
                "here without it and give the password as PGPASSWORD or in ~/.pgpass, or set the whole URL in "
                "the OPTUNA_STORAGE environment variable instead"
            )
        return url

    @model_validator(mode="after")
    def _grace(self) -> "OptunaCfg":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period} s) must exceed heartbeat_interval "
                             f"({self.heartbeat_interval} s): a live worker would look dead")
        return self


class SearchCfg(Section):
    """Every key is a ``search.<method>`` group (a ``search@<method>`` stage), validated by its method."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _groups(self) -> "SearchCfg":
        for name, group in (self.model_extra or {}).items():
            if not isinstance(group, dict):
                raise ValueError(f"{name}: expected the mapping of search.{name}, got {type(group).__name__}")
        return self

    @property
    def methods(self) -> dict[str, dict]:
        """``search.<method>`` groups as written in params.yaml."""
        return dict(self.model_extra or {})


# ------------------------------------------------------------------------ transfer
class TransferCfg(Section):
    """Fine-tuning on the downstream task (stages/transfer.py)."""

    models: Annotated[list[Str], Field(min_length=1)]  # a transfer@<model> stage each: dense or a converted method
    protocol: Literal["finetune", "linear_probe"]
    use_searched: Bool  # methods with a search: start from the search's final model, else the converted one
    train: TrainCfg


# ------------------------------------------------------------------------- latency
class LatencyCfg(Section):
    """Latency measurement (pipeline/timing.py, stages/latency.py)."""

    batch_size: Annotated[Int, Field(ge=2, le=4096)]  # timed besides batch 1
    threads: Annotated[list[Annotated[Int, Field(ge=0, le=256)]], Field(min_length=1)]  # 0 = all cores
    iterations: Annotated[Int, Field(ge=30, le=100000)]
    warmup: Annotated[Int, Field(ge=0)]
    sessions: Annotated[Int, Field(ge=1, le=100)]  # timing sessions (every variant alone in its own process)
    devices: Annotated[list[Literal["cpu", "cuda"]], Field(min_length=1)]  # cuda: when present
    eval_batch_size: Annotated[Int, Field(ge=1, le=8192)]  # accuracy of every timed variant
    runtimes: list[Literal["onnxruntime", "openvino", "native"]]  # dense baselines besides PyTorch (CPU; pipeline/runtimes.py)


# ---------------------------------------------------------------------- distributed
class DistributedCfg(Section):
    """Data-parallel training of pretrain, convert and transfer (pipeline/distributed.py)."""

    nproc_per_node: Annotated[Int, Field(ge=1, le=1024)]  # > 1: the stage runs itself under torchrun
    backend: Literal["auto", "gloo", "nccl"]  # auto: NCCL with CUDA, else gloo


# -------------------------------------------------------------------------- report
class ReportCfg(Section):
    samples_per_dataset: Annotated[Int, Field(ge=1, le=64)]


class VerdictsCfg(Section):
    """How claims are judged (pipeline/claims.py, pipeline/stats.py)."""

    family_error_rate: Annotated[Float, Field(gt=0.0, lt=0.5)]  # over every claim of one report (Holm)
    power: Annotated[Float, Field(ge=0.5, lt=1.0)]  # seeds needed for an inconclusive claim
    bootstrap_replicates: Annotated[Int, Field(ge=200, le=1_000_000)]  # single run: over test images
    bootstrap_seed: Annotated[Int, Field(ge=0)]
    spending: Literal["obrien_fleming", "pocock"]  # alpha spending of sequential studies (Lan & DeMets 1983)


class TrackingCfg(Section):
    experiment: Annotated[Str, Field(min_length=1)]
    study: Annotated[Str, Field(min_length=1)] | None  # set by the seed-study command: groups its runs in MLflow
    vary_data_seed: Bool  # set by the seed-study command: data.seed varies with train_seed (a seed, not a setting)
    system_metrics_interval: Annotated[Float, Field(ge=0.0, le=3600.0)]  # s between CPU/memory samples; 0 = off
    # s a stage waits for a tracking store that stopped answering (server restart) before it stops with one line
    retry_seconds: Annotated[Float, Field(ge=0.0, le=86400.0)]


class ReferenceRow(Section):
    """One number a paper (or its official code) reports, set beside this run's value of the same quantity."""

    model: Annotated[Str, Field(min_length=1)]  # dense, or a method or control of this run
    metric: Literal["test_acc", "acc_vs_dense", "macs_per_image", "mac_ratio", "params", "nonzero_params"]
    value: Float
    source: Annotated[Str, Field(min_length=1)]  # where it is reported (paper, table, official README)


class ReferenceCfg(Section):
    """A paper profile's reported numbers (profiles/*.yaml; the report's "Paper's numbers" section)."""

    profile: Annotated[Str, Field(min_length=1)] | None  # the profile applied (python -m stages.profile), null: none
    setting: Str | None  # the paper's setting in words, and how this run differs from it
    rows: list[ReferenceRow]


MethodGroups = dict[Str, dict[Str, Any]]


class Config(Section):
    train_seed: Annotated[Int, Field(ge=0, le=2**31 - 1)]  # init, shuffling, augmentation, noise, search sampling
    data: DataCfg
    model: ModelCfg
    pretrain: TrainCfg
    distributed: DistributedCfg
    convert: MethodGroups  # convert.<method>: validated by the method's schema (pipeline/methods/)
    controls: list[Str]  # the controls that run (pipeline/methods/ modules with a control_of)
    optuna: OptunaCfg
    search: SearchCfg
    transfer: TransferCfg
    latency: LatencyCfg
    report: ReportCfg
    claims: dict[Str, dict[Str, Float]]  # claims.<method>.<claim>: the claim's margin (checked by its type)
    verdicts: VerdictsCfg
    tracking: TrackingCfg
    reference: ReferenceCfg

    @model_validator(mode="after")
    def _reference_models(self) -> "Config":
        known = {"dense", *self.convert, *self.controls}
        for i, row in enumerate(self.reference.rows):
            if row.model not in known:
                raise ValueError(f"reference.rows[{i}].model: '{row.model}' is not a model of this run "
                                 f"({', '.join(sorted(known))})")
        return self


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


def _key_path(loc: tuple, prefix: str) -> str:
    # drop pydantic's union/validator tags ("literal['auto']", "function-before[...]") and the
    # discriminator values of tagged unions from the key path
    parts = [str(p) for p in loc if "[" not in str(p) and not str(p).startswith("function-")]
    parts = [p for i, p in enumerate(parts) if not (p in _UNION_TAGS and i > 0)]
    return ".".join([prefix, *parts] if prefix else parts)


def format_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line for the first problem of ``err``: ``<source>: '<key path>': <what is wrong> (got ...)``."""
    first = err.errors(include_url=False)[0]
    path = _key_path(first["loc"], prefix)
    msg = first["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{path}'{suffix}"
    if first["type"] == "missing":
        return f"{source}: '{path}': missing; params.yaml must set every key{suffix}"
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx", {})
        return f"{source}: '{path}.{ctx.get('discriminator', '').strip(chr(39))}': expected one of " \
               f"{ctx.get('expected_tags')}, got {ctx.get('tag')!r}{suffix}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    where = f"'{path}'" if path else "top level"
    return redact(f"{source}: {where}: {msg}{shown}{suffix}")


S = TypeVar("S", bound=BaseModel)


def parse_section(schema: type[S], raw: Any, key: str, source: str = "params.yaml") -> S:
    """Validate one group (``key`` is its path, e.g. ``convert.dynet``); raise ConfigError naming the key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{key}': expected a mapping, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, source, key)) from None


def parse_config(raw: Any, source: str = "params.yaml") -> Config:
    """Validate an already-parsed mapping (method groups stay mappings); raise ConfigError naming the key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, source)) from None


def read_params(path: str | Path = "params.yaml") -> Any:
    """params.yaml as plain data (YAML 1.2 floats)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml (method groups are validated by their methods)."""
    return parse_config(read_params(path), str(path))


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
