"""S3DIS (Stanford3dDataset_v1.2) room reader.

A room is the concatenation of ``<room>/Annotations/<class>_<n>.txt``; each line is
``x y z r g b``. The class comes from the file name; names outside the 13 classes (e.g. ``stairs``
in Area 5) map to ``clutter``, as is S3DIS practice. Malformed lines (the real
Area_5/hallway_6 has one) are skipped, counted and logged with file and line number, or raise
``InputError`` in strict mode.
"""

from __future__ import annotations

import logging
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
    source_files: dict[str, int]  # relative path -> bytes
    skipped_lines: int


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


def _parse_lines(data: bytes, path: Path, strict: bool) -> tuple[np.ndarray, int]:
    """Line-by-line parse that skips (or, in strict mode, rejects) malformed lines."""
    rows, skipped = [], 0
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = [float(v) for v in line.split()]
            ok = len(row) == 6 and all(np.isfinite(row)) and all(0 <= c <= 255 for c in row[3:])
        except ValueError:
            ok = False
        if ok:
            rows.append(row)
            continue
        message = f"{path}: malformed line {number}: {line[:60]!r}"
        if strict:
            raise InputError(message)
        log.warning("%s (skipped)", message)
        skipped += 1
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6), skipped


def read_s3dis_room(room_dir: Path, strict: bool = False) -> S3DISRoom:
    """Read one room directory (``Area_N/<room>``) into points, colours and labels 0..12."""
    room_dir = Path(room_dir)
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    if not files:
        raise InputError(f"{room_dir}: no Annotations/*.txt files (not an S3DIS room directory)")
    parts, labels, sources, skipped = [], [], {}, 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InputError(f"{path}: cannot read ({error.strerror})") from error
        values = _parse_fast(data)
        if values is None:
            values, bad = _parse_lines(data, path, strict)
            skipped += bad
        label = class_of(path)
        if label == CLUTTER and not path.stem.startswith("clutter"):
            log.info("%s: class not among the 13 S3DIS classes, mapped to clutter", path)
        parts.append(values)
        labels.append(np.full(len(values), label, dtype=np.uint8))
        sources[str(path.relative_to(room_dir))] = len(data)
    values = np.concatenate(parts)
    if len(values) == 0:
        raise InputError(f"{room_dir}: the annotation files hold no points")
    return S3DISRoom(
        xyz=values[:, :3].astype(np.float32),
        rgb=np.rint(values[:, 3:]).astype(np.uint8),
        label=np.concatenate(labels),
        source_files=sources,
        skipped_lines=skipped,
    )
