"""Checkpoint and model-file I/O: atomic writes, ``weights_only`` reads, fingerprinted resume states.

- :func:`save_atomic` writes to a temporary file in the same folder and
  renames it: a reader never sees a half-written file, and a kill during the
  write leaves the previous file intact.
- :func:`load_checkpoint` reads with ``torch.load(..., weights_only=True)``;
  a missing, truncated or foreign file is one clear error.
- Resume states of the training engine (:func:`save_resume`,
  :func:`load_resume`) carry a fingerprint of everything the run depends on,
  the code included (:func:`code_version`); a state with another fingerprint
  is ignored, never loaded into a different experiment.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from pipeline.atomic import replacing
from pipeline.errors import CheckpointError


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file
    (:func:`pipeline.atomic.replacing`; a full disk is one line naming ``path``)."""
    with replacing(path, keep_suffix=False) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; a truncated file is a clear error."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found: run the stage that writes it first")
    try:
        with warnings.catch_warnings():
            # sparse tensors (pruned SD-Conv kernels) are validated on load; that is wanted, not news
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip errors, unpickling errors, EOF
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err}); rerun the stage that writes it") from None


def code_version() -> str:
    """sha256 of the library and stage sources: a resume state from other code is not reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted([*root.glob("pipeline/**/*.py"), *root.glob("stages/*.py")]):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def resume_fingerprint(key: str) -> str:
    """The fingerprint a resume state is stored under: the run's key and the code version."""
    return hashlib.sha256(f"{key}:{code_version()}".encode()).hexdigest()


def save_resume(path: Path, fingerprint: str, **state) -> None:
    save_atomic({"fingerprint": fingerprint, **state}, path)


def load_resume(path: Path, fingerprint: str) -> dict | None:
    """The resume state at ``path`` if its fingerprint matches; None otherwise (a broken file means: start over)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return None
    return state if state.get("fingerprint") == fingerprint else None
