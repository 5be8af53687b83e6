"""Paper profiles: a paper's own setting (data, architecture, recipe, method params) and its reported numbers,
as an overlay on params.yaml (``profiles/<name>.yaml``).

Applying a profile merges it into params.yaml, keeping the file's comments:
- mappings merge key by key; lists and scalars replace;
- in ``convert`` and ``search`` the method groups the profile names are the only ones that stay, each merged
  onto the group of the same name (a profile writes only what differs from the defaults);
- ``reference.profile`` must name the profile itself (the report states which profile a run followed).
Then ``--set key=value`` pairs (YAML values, dotted keys) apply, e.g. the data's path, and the result is
validated like the ``validate`` stage before params.yaml is replaced.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import yaml

from pipeline import methods
from pipeline.atomic import write_text
from pipeline.config import ConfigError, parse_config, read_params
from pipeline.paths import repo_root

PROFILES = repo_root() / "profiles"
SELECTING = ("convert", "search")  # sections whose method groups a profile chooses


def names(folder: Path = PROFILES) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_profile(name: str, folder: Path = PROFILES) -> dict[str, Any]:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile '{name}' not found: no {folder.name}/{name}.yaml "
                          f"(profiles: {', '.join(names(folder)) or 'none'})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path.name}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a mapping of params.yaml sections")
    if (raw.get("reference") or {}).get("profile") != name:
        raise ConfigError(f"{path.name}: reference.profile must be '{name}' (the report names the profile a run followed)")
    return raw


TAGS = ("source", "arch", "name")  # the keys that pick a variant of a group (a data source, an arch, an optimizer)


def _merge(base: Any, overlay: Any, path: str) -> Any:
    """``overlay`` merged into ``base`` (a ruamel mapping, changed in place where it is one). A group whose
    variant the profile changes (another ``data.<task>.source``, ``model.arch``, optimizer or schedule
    ``name``) is replaced whole: its keys are the new variant's."""
    if not isinstance(overlay, dict) or not isinstance(base, dict):
        return copy.deepcopy(overlay)
    if any(tag in overlay and overlay[tag] != base.get(tag) for tag in TAGS):
        return copy.deepcopy(overlay)
    if path in SELECTING:
        if not overlay:  # a fresh mapping: the emptied one would keep its comments after the key, as a block
            return {}
        for key in [k for k in base if k not in overlay]:
            del base[key]
    for key, value in overlay.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in base and not (path in SELECTING or path == "" or path.startswith("reference")):
            raise ConfigError(f"profile key '{here}' is not in params.yaml")
        base[key] = _merge(base[key], value, here) if key in base else copy.deepcopy(value)
    return base


def _set(params: dict, dotted: str, text: str) -> None:
    keys = dotted.split(".")
    node = params
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is not in params.yaml")
        node = node[key]
    if not isinstance(node, dict) or keys[-1] not in node:
        raise ConfigError(f"--set {dotted}: '{dotted}' is not in params.yaml")
    node[keys[-1]] = yaml.safe_load(text)


def _roundtrip():
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def apply(name: str, params_path: Path, sets: list[str] = (), folder: Path = PROFILES) -> dict[str, Any]:
    """Apply profile ``name`` and ``sets`` (``key=value``) to ``params_path``; returns the validated params.

    Stops with a ConfigError, leaving the file as it was, when params.yaml already follows a profile, when a
    key is unknown, or when the result does not validate."""
    profile = load_profile(name, folder)
    current = read_params(params_path)
    applied = ((current or {}).get("reference") or {}).get("profile")
    if applied:
        raise ConfigError(f"{params_path} already follows profile '{applied}': restore the defaults first "
                          f"(git checkout {params_path.name}), then apply '{name}'")
    rt = _roundtrip()
    params = rt.load(params_path.read_text())
    _merge(params, profile, "")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key=value")
        _set(params, key.strip(), value)
    out = io.StringIO()
    rt.dump(params, out)
    text = out.getvalue()
    plain = yaml.safe_load(text)
    cfg = parse_config(plain, f"{params_path.name} with profile {name}")
    methods.validate(cfg)
    write_text(params_path, text)
    return plain


def data_roots(params: dict) -> dict[str, str]:
    """task -> the data folder a profile reads (for the user to fill or point elsewhere)."""
    return {task: ds["root"] for task, ds in params["data"].items() if isinstance(ds, dict) and "root" in ds}
