"""Credentials stay in the environment: anything logged, recorded or printed shows URLs without user-info.

A database URL such as ``postgresql://lab:PASSWORD@host:5432/optuna`` is shown
as ``postgresql://host:5432/optuna`` in MLflow params and tags, run files, the
report, progress lines and error messages. The password itself comes from the
places PostgreSQL users keep it (``PGPASSWORD``, ``~/.pgpass``) or from a URL
in an environment variable (``OPTUNA_STORAGE``, ``MLFLOW_TRACKING_URI``),
never from params.yaml, which is committed and recorded in dvc.lock.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

# scheme://userinfo@ : the user-info part ends at the last "@" before the host (passwords may hold "@").
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^\s/'\"<>]*@)")


def redact(text: str) -> str:
    """``text`` with the user-info part of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def redact_value(value: Any) -> Any:
    """``value`` with every string in it redacted (mappings, lists and tuples walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password in its user-info part."""
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return "@" in url.partition("://")[2].partition("/")[0]
