"""A full file system for tests: a small tmpfs mounted over a folder, holding given files, the rest of its
space taken by a filler file, unmounted afterwards (the folder's own content reappears). Mounting needs
root; without it the context yields None and the test skips with that reason."""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PAGE = 4096


@contextmanager
def full_disk(folder: Path, keep: dict[str, bytes] | None = None, slack: int = 64 * 1024) -> Iterator[Path | None]:
    """Mount a tmpfs over ``folder`` with the files ``keep`` (name -> bytes) and no free space left."""
    keep = keep or {}
    folder.mkdir(parents=True, exist_ok=True)
    size = sum(-(-len(b) // PAGE) * PAGE for b in keep.values()) + slack
    if os.geteuid() != 0:
        yield None
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        yield None
        return
    try:
        for name, data in keep.items():
            (folder / name).write_bytes(data)
        with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
            try:
                while f.write(b"\0" * PAGE):
                    pass
            except OSError:
                pass
        yield folder
    finally:
        gc.collect()  # a writer that failed may hold its file open until collected (torch.save does)
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
