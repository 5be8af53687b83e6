"""What a method is: the one protocol every method module implements, and helpers several share.

A method module (``pipeline/methods/<name>.py``) defines ``METHOD``, an
instance of a :class:`Method` subclass, and everything method-specific lives
there: the schema of its params group ``convert.<name>``, how its model is
built from the dense one, what it adds to the training engine (schedules,
losses, per-epoch metrics), what it measures, how its model file stores it,
its search space (optional), its transfer hooks, its latency variants, its
report columns and the claims it checks. Code outside ``pipeline/methods/``
asks the registry (:mod:`pipeline.methods`) and never branches on a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.claims import Claim
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, DistillCfg, SearchCommon, Section, TemperatureCfg, TrainCfg, parse_section
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.models.surgery import narrow_copy
from pipeline.paths import MODELS, RESULTS
from pipeline.train import Hooks


class MethodParams(Section):
    """Keys every converted method's ``convert.<name>`` group has."""

    distill: DistillCfg
    train: TrainCfg


@dataclass(frozen=True)
class Variant:
    """One model the latency stage times: its name, model file, the stage whose test accuracy it must
    keep, and how the loaded model is turned into the timed one (e.g. sparse execution)."""

    name: str
    file: Path
    stage: str
    transform: Callable[[nn.Module], nn.Module] | None = None


class SearchSpace:
    """A method's Optuna search: schema of ``search.<name>``, objectives, sampling and applying a sample.

    A trial loads the converted model, calls :meth:`apply` with the sampled
    values, fine-tunes and is scored on the validation split.
    """

    Params: ClassVar[type[SearchCommon]]
    objectives: ClassVar[tuple[str, ...]]  # objective 0 (val_acc) is maximised, the rest minimised
    select_cost: ClassVar[str]  # the cost best.json minimises among near-best Pareto trials
    searches: ClassVar[str]  # what it searches, for the report's heading (e.g. "threshold")

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The searched modules (named), whose output resolution defines the stages."""
        raise NotImplementedError

    def suggest(self, trial: Any, n_stages: int, space: Any) -> dict[str, float]:
        """Sample one configuration (parameter names as stored in the study)."""
        raise NotImplementedError

    @staticmethod
    def draw(trial: Any, name: str, r: Any) -> float:
        """One float from a :class:`~pipeline.config.RangeCfg` (log scale if it says so)."""
        return trial.suggest_float(name, r.low, r.high, log=r.log)

    def apply(self, model: nn.Module, sample: dict[str, float], stages: list[int], p: Any, sp: Any, *,
              teacher: nn.Module | None, val_x: torch.Tensor) -> Hooks:
        """Apply ``sample`` to ``model`` and return the hooks its fine-tune trains with."""
        raise NotImplementedError

    def final_params(self, p: Any, sample: dict[str, float]) -> Any:
        """The method params that describe the searched model (for its measurements)."""
        return p


class Method:
    """Base of every method; subclasses override what differs. See the module docstring."""

    name: ClassVar[str]  # registry key = module name = params group name
    label: ClassVar[str]  # shown in the report
    paper: ClassVar[str]  # the source the method follows
    Params: ClassVar[type[MethodParams] | None] = None  # schema of convert.<name>; None: no convert stage
    search: ClassVar[SearchSpace | None] = None
    baseline: ClassVar[bool] = False  # the dense model every method is compared with
    # A control runs its target method's recipe without the ingredient under test (e.g. DyNet's training
    # without dynamic kernels); its params are the ones of convert.<control_of> its schema names.
    control_of: ClassVar[str | None] = None
    columns: ClassVar[dict[str, str]] = {}  # report column -> metric of the convert stage (a study summarises them)
    counting: ClassVar[str] = ""  # how its operators count their MACs, for the report (a clause)

    # ------------------------------------------------------------------ params
    def params(self, cfg: Config) -> Any:
        """``convert.<name>`` validated against :attr:`Params` (a control: the keys of its target's group
        that its schema names)."""
        if self.Params is None:
            raise ConfigError(f"method '{self.name}' has no convert group")
        group = self.control_of or self.name
        if group not in cfg.convert:
            raise ConfigError(f"params.yaml: 'convert.{group}': missing; the {self.label} method needs its group")
        raw = cfg.convert[group]
        if self.control_of:
            raw = {k: v for k, v in raw.items() if k in self.Params.model_fields}
        return parse_section(self.Params, raw, f"convert.{group}")

    def search_params(self, cfg: Config) -> Any:
        """``search.<name>`` validated against the search space's schema."""
        if self.search is None:
            raise ConfigError(f"params.yaml: 'search.{self.name}': {self.label} has no search space")
        groups = cfg.search.methods
        if self.name not in groups:
            raise ConfigError(f"params.yaml: 'search.{self.name}': missing; the {self.label} search needs its group")
        return parse_section(self.search.Params, groups[self.name], f"search.{self.name}")

    # ------------------------------------------------------------------ model
    @property
    def model_file(self) -> Path:
        return MODELS / f"{self.name}.pt"

    @property
    def searched_file(self) -> Path:
        return MODELS / f"search_{self.name}.pt"

    @property
    def stage(self) -> str:
        """The stage that writes :attr:`model_file`."""
        return f"control@{self.name}" if self.control_of else f"convert@{self.name}"

    @property
    def results_dir(self) -> Path:
        """Where :attr:`stage` writes its results (``metrics.json``, ``layers.json``, ...)."""
        return RESULTS / "convert" / self.name

    @property
    def layers_file(self) -> Path:
        """Per-layer values of :meth:`measure` (``layers.json``)."""
        return self.results_dir / "layers.json"

    @property
    def search_dir(self) -> Path:
        """Where ``search@<name>`` writes its results (``best.json``, ``pareto.csv``, ``trials.csv``, ...)."""
        return RESULTS / "search" / self.name

    @property
    def transfer_dir(self) -> Path:
        """Where ``transfer@<name>`` writes its results."""
        return RESULTS / "transfer" / self.name

    def backbone(self, model_cfg: Any, p: Any) -> Any:
        """The backbone params the method builds on (default: the dense one)."""
        return model_cfg

    def width(self, p: Any) -> float:
        """Channel multiplier of the method's backbone relative to the dense one."""
        return 1.0

    def convert(self, model: nn.Module, p: Any, seed: int) -> list[str]:
        """Turn ``model`` (the backbone, dense weights already in) into the method's model in place;
        returns the names of the converted modules."""
        raise NotImplementedError

    def build(self, model_cfg: Any, p: Any, in_channels: int, num_classes: int, seed: int,
              dense: nn.Module | None = None) -> tuple[nn.Module, list[str]]:
        """The method's model; with ``dense`` given, its weights are carried over first."""
        bcfg = self.backbone(model_cfg, p)
        model = build_model(bcfg, in_channels, num_classes)
        if dense is not None:
            if bcfg is model_cfg:
                model.load_state_dict(dense.state_dict())
            else:
                narrow_copy(dense, model)
        return model, self.convert(model, p, seed)

    def warm_start(self, model: nn.Module, p: Any, cfg: Config, x: torch.Tensor) -> None:
        """Set ``model`` (built with the dense weights) up for training from other stages' outputs; ``x`` is
        a batch of training images. Controls use it (e.g. the trained DyNet model and SD-Conv's sparsity)."""

    def pack(self, model: nn.Module) -> tuple[dict, dict]:
        """(state dict, extra tensors) as the model file stores them."""
        return model.state_dict(), {}

    def unpack(self, state: dict, extra: dict) -> dict:
        """The state dict to load from what :meth:`pack` stored."""
        return state

    def restore(self, model: nn.Module, p: Any) -> None:
        """Restore what the state dict does not hold (e.g. a temperature) after loading."""

    # ------------------------------------------------------------------ training
    def hooks(self, model: nn.Module, p: Any, *, teacher: nn.Module | None, val_x: torch.Tensor) -> Hooks:
        """What the method adds to the training engine while it is converted."""
        return Hooks()

    def measure(self, model: nn.Module, x: torch.Tensor, p: Any) -> tuple[dict[str, float], dict[str, dict]]:
        """Method metrics on the (normalised) images ``x``, and per-layer values (``layers.json``)."""
        return {}, {}

    def per_image(self, model: nn.Module, x: torch.Tensor, p: Any) -> dict[str, list[float]]:
        """Per-image values of the method's metrics on the images ``x`` (their mean is the metric), for the
        test-set bootstrap of a single run's verdicts; e.g. DynConv's executed fraction."""
        return {}

    def measure_all(self, model: nn.Module, x: torch.Tensor, p: Any) -> tuple[dict[str, float], dict[str, dict]]:
        """MACs and FLOPs per image (masks as they fire at eval on ``x``), params, nonzero params, and
        :meth:`measure`'s metrics and per-layer values."""
        own, layers = self.measure(model, x, p)
        metrics = {"macs_per_image": count_macs(model, x), **count_params(model), **own}
        metrics["flops_per_image"] = 2 * metrics["macs_per_image"]
        return metrics, layers

    # ------------------------------------------------------------------ transfer
    def transfer_source(self, cfg: Config) -> Path:
        """The model file the downstream transfer starts from."""
        if self.search is not None and cfg.transfer.use_searched:
            return self.searched_file
        return self.model_file

    def transfer_setup(self, model: nn.Module, cfg: Config) -> dict[str, float]:
        """Prepare the loaded model for transfer; returns metrics of its state before it."""
        return {}

    def transfer_hooks(self, model: nn.Module, cfg: Config, record: dict, val_x: torch.Tensor) -> Hooks:
        """What the method adds to the transfer fine-tune (protocol ``finetune``)."""
        return Hooks()

    def transfer_metrics(self, model: nn.Module, x: torch.Tensor, before: dict[str, float]) -> dict[str, float]:
        """Method metrics after transfer, on the downstream test images ``x``."""
        return {}

    def transfer_note(self, cfg: Config) -> str:
        """What its transfer keeps or changes beyond the common protocol, for the report (a sentence or "")."""
        return ""

    # ------------------------------------------------------------------ latency
    def latency_variants(self) -> list[Variant]:
        """The models of this method the latency stage times."""
        return [Variant(self.name, self.model_file, self.stage)]

    # ------------------------------------------------------------------ report
    def recipe(self, p: Any) -> str:
        """How the method was trained, in a few words, for the report (e.g. which variants of the paper's recipe)."""
        return ""

    def claims(self) -> list[Claim]:
        """The papers' claims this method checks, as data (:mod:`pipeline.claims`); their bounds are params
        ``claims.<name>.<claim>``."""
        return []

    def spatial_masks(self, model: nn.Module) -> list[tuple[str, torch.Tensor]] | None:
        """Per module, the spatial masks ``[B, 1, H, W]`` of the last forward (None: the method has none)."""
        return None


# ----------------------------------------------------------------- shared helpers
def temperature_at(t: TemperatureCfg, epoch: int) -> float:
    """Linear anneal from ``t.start`` to ``t.end`` over ``t.epochs`` epochs, then ``t.end``."""
    if t.epochs == 0 or epoch >= t.epochs:
        return t.end
    return t.start + (t.end - t.start) * epoch / t.epochs


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    return F.kl_div(
        F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
        log_target=True, reduction="batchmean",
    ) * temperature**2


def distill_term(distill: DistillCfg, teacher: nn.Module | None, inputs: torch.Tensor,
                 logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"distill": weight * distill_loss}`` against the teacher's logits; empty without a teacher or weight."""
    if teacher is None or distill.weight <= 0:
        return {}
    with torch.no_grad():
        t_logits = teacher(inputs)
    return {"distill": distill.weight * distill_loss(logits, t_logits, distill.temperature)}


