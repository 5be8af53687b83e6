"""The method registry: every module of this package that defines ``METHOD`` is a method.

Adding a method is adding a module here, plus its operator in ``pipeline/ops``
and its params group ``convert.<name>`` (and ``search.<name>``, a name in
``transfer.models``, where it has them); nothing else changes: dvc.yaml's
``foreach`` stages iterate those params groups. The registry discovers the modules by
scanning this package and imports all of them, so every stage that asks it
depends on every method module (dvc.yaml lists ``pipeline/methods`` and
``pipeline/ops`` as its deps; ``tests/test_dvc_deps.py`` checks that).

- :func:`get` — the method of a name; an unknown name is an error, never
  another method's behaviour.
- :func:`in_pipeline` — the baseline, then the methods of ``convert`` in
  params order: what the latency stage times and the report shows;
  :func:`controls` — the controls of ``controls`` that run; :func:`transferred`
  — the models of ``transfer.models``.
- :func:`validate` — every method group of params.yaml against its schema.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.methods.base import Method

_REGISTRY: dict[str, Method] = {}


def registry() -> dict[str, Method]:
    """Name -> method, for every method module of this package (imported on first use)."""
    if not _REGISTRY:
        found = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{__name__}.{info.name}")
            method = getattr(module, "METHOD", None)
            if method is None:
                continue
            if not isinstance(method, Method) or method.name != info.name:
                raise TypeError(f"{module.__name__}.METHOD must be a Method named {info.name!r}")
            found[info.name] = method
        _REGISTRY.update(found)
    return _REGISTRY


def names() -> list[str]:
    return list(registry())


def get(name: str, key: str = "method") -> Method:
    """The registered method ``name``; ``key`` names where the name came from in the error."""
    methods = registry()
    if name not in methods:
        raise ConfigError(f"{key}: unknown method {name!r}; registered: {', '.join(methods)}")
    return methods[name]


def baseline() -> Method:
    return next(m for m in registry().values() if m.baseline)


def converted(cfg: Config) -> list[Method]:
    """The methods with a ``convert`` group, in params order."""
    return [get(name, f"params.yaml: 'convert.{name}'") for name in cfg.convert]


def in_pipeline(cfg: Config) -> list[Method]:
    return [baseline(), *converted(cfg)]


def controls(cfg: Config) -> list[Method]:
    """The controls that run (``controls`` in params order)."""
    return [get(name, "params.yaml: 'controls'") for name in cfg.controls]


def with_controls(cfg: Config) -> list[Method]:
    """The baseline, then every converted method followed by its controls that run."""
    out = [baseline()]
    for m in converted(cfg):
        out += [m, *[c for c in controls(cfg) if c.control_of == m.name]]
    return out


def searched(cfg: Config) -> list[Method]:
    """The methods with a ``search`` group, in params order."""
    return [get(name, f"params.yaml: 'search.{name}'") for name in cfg.search.methods]


def transferred(cfg: Config) -> list[Method]:
    """The models fine-tuned downstream (``transfer.models`` in params order)."""
    return [get(name, "params.yaml: 'transfer.models'") for name in cfg.transfer.models]


def operating_point(stage: str, cfg: Config) -> str:
    """Which model of its method a stage's metrics describe: ``searched`` (a search's final model, or a
    transfer that starts from it) or ``converted`` (the converted model, a control, the dense model)."""
    kind, _, name = stage.partition("@")
    if kind == "search":
        return "searched"
    if kind == "transfer":
        m = get(name, f"stage {stage}")
        return "searched" if m.search is not None and m.transfer_source(cfg) == m.searched_file else "converted"
    return "converted"


def validate(cfg: Config) -> None:
    """Validate every ``convert.<method>`` and ``search.<method>`` group with its method's schema."""
    for method in converted(cfg):
        if method.Params is None:
            raise ConfigError(f"params.yaml: 'convert.{method.name}': {method.label} is not converted; remove the group")
        method.params(cfg)
    for method in searched(cfg):
        if method.name not in cfg.convert:
            raise ConfigError(f"params.yaml: 'search.{method.name}': searches start from the converted model; "
                              f"add convert.{method.name}")
        method.search_params(cfg)
    for method in controls(cfg):
        if method.control_of is None:
            raise ConfigError(f"params.yaml: 'controls': {method.name} is a method, not a control; controls are "
                              + ", ".join(m.name for m in registry().values() if m.control_of))
        if method.control_of not in cfg.convert:
            raise ConfigError(f"params.yaml: 'controls': {method.name} controls {method.control_of}, which has no "
                              f"convert.{method.control_of} group")
        method.params(cfg)
    names = cfg.transfer.models
    for method in transferred(cfg):
        if not method.baseline and method.name not in cfg.convert:
            raise ConfigError(f"params.yaml: 'transfer.models': {method.name} has no convert.{method.name} group; "
                              f"transfer.models names the dense model and methods of convert")
        if names.count(method.name) > 1:
            raise ConfigError(f"params.yaml: 'transfer.models': {method.name} is listed twice")
    for method in in_pipeline(cfg):
        expected = {c.name for c in method.claims()}
        given = cfg.claims.get(method.name, {})
        if expected and set(given) != expected:
            missing, unknown = sorted(expected - set(given)), sorted(set(given) - expected)
            key = f"claims.{method.name}." + (missing[0] if missing else unknown[0])
            raise ConfigError(f"params.yaml: '{key}': " + ("missing; every claim needs its bound" if missing
                                                            else f"unknown claim; {method.label} states {sorted(expected)}"))
        for claim in method.claims():
            problem = claim.validate_margin(given[claim.name])
            if problem:
                raise ConfigError(f"params.yaml: 'claims.{method.name}.{claim.name}': {problem}")
    for name in cfg.claims:
        get(name, f"params.yaml: 'claims.{name}'")
