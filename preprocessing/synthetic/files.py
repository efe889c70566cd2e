"""File-system helpers of the synthetic writers: argument checks, atomic files and directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from storage.errors import InputError


def check_out_dir(out_dir: Path, sub: str, count: int, what: str, seed: int) -> Path:
    """Validate the arguments before anything is written (InputError with a one-line message)."""
    out_dir = Path(out_dir)
    for path in (out_dir, out_dir / sub):
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a directory")
    if count < 1:
        raise InputError(f"--{what} must be at least 1 (got {count})")
    if seed < 0:
        raise InputError(f"--seed must be non-negative (got {seed})")
    return out_dir


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def fresh_temp_dir(parent: Path, name: str) -> Path:
    """An empty hidden directory next to the final `parent/name`, for writing it completely first."""
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a completely written directory to its final name, replacing an older one."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
