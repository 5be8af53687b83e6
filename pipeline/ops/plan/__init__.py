"""The compiled inference engine: the builder operators describe themselves to (:mod:`.builder`) and the
planned model (:mod:`.model`); the C++ side is ``pipeline/ops/csrc/model_plan.h``."""

from pipeline.ops.plan.builder import ACT_NONE, ACT_RELU, ACT_RELU6, PlanBuilder, Unsupported
from pipeline.ops.plan.model import PlannedModel, compile_model, plan_or_reason, planned, probe_shape

__all__ = ["ACT_NONE", "ACT_RELU", "ACT_RELU6", "PlanBuilder", "PlannedModel", "Unsupported", "compile_model",
           "plan_or_reason", "planned", "probe_shape"]
