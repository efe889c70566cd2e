"""S3DIS (Stanford3dDataset_v1.2) room reader.

A room is the concatenation of ``<room>/Annotations/<class>_<n>.txt``; each line is
``x y z r g b``. The class comes from the file name; names outside the 13 classes (e.g. ``stairs``
in Area 5) map to ``clutter``, as is S3DIS practice. Two defects of the real release are handled:
- a NUL byte where a space belongs (the real Area_5/hallway_6 ceiling file): the line is
  repaired (NUL read as a space) when it then holds six valid numbers, and logged;
- a byte-identical copy of an annotation file in the same room (``wall_3 (1).txt`` beside
  ``wall_3.txt``): counted once (the name without a copy suffix is kept), and logged.
Other malformed lines are skipped, counted and logged with file and line number, or raise
``InputError`` in strict mode.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import InputError

log = logging.getLogger(__name__)

S3DIS_CLASSES: tuple[str, ...] = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door",
    "table", "chair", "sofa", "bookcase", "board", "clutter",
)
CLUTTER = S3DIS_CLASSES.index("clutter")


@dataclass
class S3DISRoom:
    """One room: points with colour and class index 0..12 (S3DIS_CLASSES order)."""

    xyz: np.ndarray  # float32 [N,3]
    rgb: np.ndarray  # uint8 [N,3]
    label: np.ndarray  # uint8 [N]
    source_files: dict[str, int]  # relative path -> bytes (duplicates included: they are inputs too)
    skipped_lines: int
    repaired_lines: int = 0  # lines with a NUL byte for a space, read with the space
    duplicate_files: tuple[str, ...] = ()  # byte-identical copies left out (relative paths)


def class_of(path: Path) -> int:
    """Class index from an annotation file name (``chair_3.txt`` -> 8); unknown names -> clutter."""
    name = path.stem.rsplit("_", 1)[0] if "_" in path.stem else path.stem
    return S3DIS_CLASSES.index(name) if name in S3DIS_CLASSES else CLUTTER


def _parse_fast(data: bytes) -> np.ndarray | None:
    """All lines well formed -> float64[N,6]; otherwise None (the slow path finds the bad lines)."""
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    try:
        values = np.array(data.split(), dtype=np.float64)
    except ValueError:
        return None
    if values.size != 6 * lines or not np.isfinite(values).all():
        return None
    values = values.reshape(-1, 6)
    if ((values[:, 3:] < 0) | (values[:, 3:] > 255)).any():
        return None
    return values


def _row(line: bytes) -> list[float] | None:
    """Six valid numbers (finite, colours in 0..255) from one line, or None."""
    try:
        row = [float(v) for v in line.split()]
    except ValueError:
        return None
    ok = len(row) == 6 and all(np.isfinite(row)) and all(0 <= c <= 255 for c in row[3:])
    return row if ok else None


def _parse_lines(data: bytes, path: Path, strict: bool) -> tuple[np.ndarray, int, int]:
    """Line-by-line parse: repairs NUL-for-space lines, skips (strict: rejects) other malformed ones.

    -> (values [N,6], skipped lines, repaired lines).
    """
    rows, skipped, repaired = [], 0, 0
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        row = _row(line)
        if row is None and b"\0" in line:
            row = _row(line.replace(b"\0", b" "))
            if row is not None:
                log.warning("%s: line %d has a NUL byte for a space: read as %s", path, number,
                            " ".join(f"{v:g}" for v in row))
                repaired += 1
        if row is not None:
            rows.append(row)
            continue
        message = f"{path}: malformed line {number}: {line[:60]!r}"
        if strict:
            raise InputError(message)
        log.warning("%s (skipped)", message)
        skipped += 1
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6), skipped, repaired


_COPY_SUFFIX = re.compile(r" \(\d+\)$")


def _without_duplicates(files: list[Path], room_dir: Path) -> tuple[list[tuple[Path, bytes]], list[str]]:
    """Read the files; of byte-identical ones keep one (a name without `` (n)`` first, then sorted).

    -> ([(path, bytes)] kept in sorted order, relative paths of the copies left out).
    """
    read: list[tuple[Path, bytes]] = []
    for path in files:
        try:
            read.append((path, path.read_bytes()))
        except OSError as error:
            raise InputError(f"{path}: cannot read ({error.strerror})") from error
    by_content: dict[tuple[int, bytes], list[Path]] = {}
    for path, data in read:
        by_content.setdefault((len(data), hashlib.sha256(data).digest()), []).append(path)
    dropped: set[Path] = set()
    for paths in by_content.values():
        if len(paths) > 1:
            keep = min(paths, key=lambda p: (bool(_COPY_SUFFIX.search(p.stem)), p.name))
            copies = [p for p in paths if p != keep]
            log.warning("%s: byte-identical to %s, counted once", ", ".join(str(p) for p in copies), keep)
            dropped.update(copies)
    kept = [(path, data) for path, data in read if path not in dropped]
    return kept, sorted(str(p.relative_to(room_dir)) for p in dropped)


def read_s3dis_room(room_dir: Path, strict: bool = False) -> S3DISRoom:
    """Read one room directory (``Area_N/<room>``) into points, colours and labels 0..12."""
    room_dir = Path(room_dir)
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    if not files:
        raise InputError(f"{room_dir}: no Annotations/*.txt files (not an S3DIS room directory)")
    parts, labels, skipped, repaired = [], [], 0, 0
    sources = {str(path.relative_to(room_dir)): path.stat().st_size for path in files}
    kept, duplicates = _without_duplicates(files, room_dir)
    for path, data in kept:
        values = _parse_fast(data)
        if values is None:
            values, bad, fixed = _parse_lines(data, path, strict)
            skipped += bad
            repaired += fixed
        label = class_of(path)
        if label == CLUTTER and not path.stem.startswith("clutter"):
            log.info("%s: class not among the 13 S3DIS classes, mapped to clutter", path)
        parts.append(values)
        labels.append(np.full(len(values), label, dtype=np.uint8))
    values = np.concatenate(parts)
    if len(values) == 0:
        raise InputError(f"{room_dir}: the annotation files hold no points")
    return S3DISRoom(
        xyz=values[:, :3].astype(np.float32),
        rgb=np.rint(values[:, 3:]).astype(np.uint8),
        label=np.concatenate(labels),
        source_files=sources,
        skipped_lines=skipped,
        repaired_lines=repaired,
        duplicate_files=tuple(duplicates),
    )
