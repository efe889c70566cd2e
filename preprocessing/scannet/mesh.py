"""ScanNet v2 scene mesh + annotations: vertices, colours, NYU40 and ScanNet200 raw-category labels.

Files of one scene (``scans/<id>/``):
- ``<id>_vh_clean_2.ply``: vertices x, y, z, red, green, blue (binary PLY);
- ``<id>_vh_clean_2.labels.ply``: the same vertices with the NYU40 id in ``label``;
- ``<id>_vh_clean_2.0.010000.segs.json``: ``segIndices``, one over-segment id per vertex;
- ``<id>.aggregation.json``: ``segGroups``, objects as lists of segments with a raw category
  name as ``label`` (``couch``, ``office chair``), mapped to its id through the ``id`` and
  ``raw_category`` columns of ``scannetv2-labels.combined.tsv``;
- ``<id>.txt``: scene metadata including ``axisAlignment`` (row-major 4x4).

Coordinates stay in the raw frame, the frame of the ``.sens`` poses; the axis alignment is kept
so callers apply it where they need aligned coordinates.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElementParseError, PlyHeaderParseError

from storage.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class ScanNetMesh:
    """One scene's vertices with labels, in the raw (sensor) frame."""

    xyz: np.ndarray  # float32 [N,3]
    rgb: np.ndarray  # uint8 [N,3]
    nyu40: np.ndarray  # uint8 [N], 0 = unannotated
    category: np.ndarray  # uint16 [N], raw category id (TSV `id`), 0 = unannotated
    axis_alignment: np.ndarray  # float64 [4,4]
    source_files: dict[str, int]  # file name -> bytes


def scene_paths(scene_dir: Path) -> dict[str, Path]:
    """The annotation files of the scene directory ``scans/<id>``."""
    scene = Path(scene_dir).name
    return {
        "mesh": scene_dir / f"{scene}_vh_clean_2.ply",
        "labels": scene_dir / f"{scene}_vh_clean_2.labels.ply",
        "segs": scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json",
        "aggregation": scene_dir / f"{scene}.aggregation.json",
        "meta": scene_dir / f"{scene}.txt",
    }


def _vertices(path: Path) -> np.ndarray:
    """The vertex element of a PLY file as a structured array (faces are read with a fast path)."""
    try:
        with open(path, "rb") as f:
            try:
                ply = PlyData.read(f, known_list_len={"face": {"vertex_indices": 3}})
            except (PlyElementParseError, ValueError):
                f.seek(0)
                ply = PlyData.read(f)
    except FileNotFoundError as error:
        raise InputError(f"{path}: file not found") from error
    except (PlyHeaderParseError, PlyElementParseError, ValueError, EOFError, OSError) as error:
        raise InputError(f"{path}: corrupt PLY ({str(error).splitlines()[0] if str(error) else error!r})") \
            from error
    if "vertex" not in ply:
        raise InputError(f"{path}: PLY has no vertex element")
    return ply["vertex"].data


def _field(vertices: np.ndarray, name: str, path: Path) -> np.ndarray:
    if name not in (vertices.dtype.names or ()):
        raise InputError(f"{path}: PLY vertex element has no {name!r} property")
    return vertices[name]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: file not found") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: invalid JSON ({error})") from error


@functools.lru_cache(maxsize=4)
def _label_table(path: str, mtime_ns: int) -> dict[str, int]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: label TSV not found") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); save the label TSV as UTF-8") from None
    if not rows or not {"id", "raw_category"} <= set(rows[0]):
        raise InputError(f"{path}: not a ScanNet label TSV (needs columns id and raw_category)")
    table = {}
    for number, row in enumerate(rows, start=2):
        try:
            table[row["raw_category"]] = int(row["id"])
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: line {number}: invalid id {row.get('id')!r}") from error
    return table


def label_tsv_version(path: Path) -> int:
    """The label TSV's mtime (the cache key of the tables read from it); InputError when missing."""
    try:
        return Path(path).stat().st_mtime_ns
    except FileNotFoundError as error:
        raise InputError(f"{path}: label TSV not found") from error


def read_label_tsv(path: Path) -> dict[str, int]:
    """raw_category -> id from ``scannetv2-labels.combined.tsv`` (cached per file version)."""
    return _label_table(str(path), label_tsv_version(path))


def read_axis_alignment(path: Path) -> np.ndarray:
    """The ``axisAlignment`` matrix of ``<id>.txt`` (identity if the scene has none)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise InputError(f"{path}: scene metadata file not found") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start})") from None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "axisAlignment":
            try:
                values = [float(v) for v in value.split()]
            except ValueError:
                values = []
            if len(values) != 16 or not np.isfinite(values).all():
                raise InputError(f"{path}: axisAlignment needs 16 numbers, got {value.strip()[:80]!r}")
            return np.array(values, dtype=np.float64).reshape(4, 4)
    log.warning("%s: no axisAlignment, using identity", path)
    return np.eye(4)


def categories_per_vertex(segs_path: Path, aggregation_path: Path, num_vertices: int,
                          table: dict[str, int], tsv_path: Path) -> np.ndarray:
    """uint16[N] raw category id per vertex from over-segments + object groups (0 = unannotated)."""
    segs = _read_json(segs_path)
    seg_indices = np.asarray(segs.get("segIndices", []), dtype=np.int64)
    if seg_indices.shape != (num_vertices,):
        raise InputError(f"{segs_path}: segIndices has {seg_indices.size} entries "
                         f"for {num_vertices} vertices")
    if seg_indices.size and seg_indices.min() < 0:
        raise InputError(f"{segs_path}: negative segment id {seg_indices.min()}")
    groups = _read_json(aggregation_path).get("segGroups")
    if not isinstance(groups, list):
        raise InputError(f"{aggregation_path}: no segGroups list")
    size = int(seg_indices.max()) + 1 if seg_indices.size else 0
    present = np.zeros(size, dtype=bool)
    present[seg_indices] = True
    segment_category = np.zeros(size, dtype=np.uint16)  # later groups win where groups overlap
    for group in groups:
        name = group.get("label")
        if name not in table:
            raise InputError(f"{aggregation_path}: object {group.get('objectId')} has raw category {name!r}, "
                             f"not in {tsv_path}")
        segments = np.asarray(group.get("segments", []), dtype=np.int64)
        inside = (segments >= 0) & (segments < size)
        unknown = segments[~inside | ~present[np.where(inside, segments, 0)]]
        if unknown.size:
            raise InputError(f"{aggregation_path}: object {group.get('objectId')} refers to segments "
                             f"{unknown[:5].tolist()} not in {segs_path.name}")
        segment_category[segments] = table[name]
    return segment_category[seg_indices]


def read_scannet_scene(scene_dir: Path, label_tsv: Path, annotated: bool = True) -> ScanNetMesh:
    """Read the mesh, labels and annotations of one ScanNet v2 scene directory.

    ``annotated=False`` (test scenes under ``scans_test/``, which ship without annotations): only
    the mesh and ``<id>.txt`` are read and every vertex is unannotated (0).
    """
    scene_dir = Path(scene_dir)
    paths = scene_paths(scene_dir)
    mesh = _vertices(paths["mesh"])
    xyz = np.stack([_field(mesh, c, paths["mesh"]) for c in "xyz"], axis=1).astype(np.float32)
    rgb = np.stack([_field(mesh, c, paths["mesh"]) for c in ("red", "green", "blue")], axis=1)
    if not np.isfinite(xyz).all():
        raise InputError(f"{paths['mesh']}: non-finite vertex coordinates")
    if not annotated:
        return ScanNetMesh(xyz=xyz, rgb=np.clip(rgb, 0, 255).astype(np.uint8),
                           nyu40=np.zeros(len(xyz), np.uint8), category=np.zeros(len(xyz), np.uint16),
                           axis_alignment=read_axis_alignment(paths["meta"]),
                           source_files={p.name: p.stat().st_size for p in (paths["mesh"], paths["meta"])})
    labeled = _vertices(paths["labels"])
    if len(labeled) != len(mesh):
        raise InputError(f"{paths['labels']}: {len(labeled)} vertices, "
                         f"but {paths['mesh'].name} has {len(mesh)}")
    label = _field(labeled, "label", paths["labels"]).astype(np.int64)
    if label.size and (label.min() < 0 or label.max() > 40):
        raise InputError(f"{paths['labels']}: NYU40 labels must be in 0..40, "
                         f"found {label.min()}..{label.max()}")
    table = read_label_tsv(label_tsv)
    category = categories_per_vertex(paths["segs"], paths["aggregation"], len(mesh), table, Path(label_tsv))
    return ScanNetMesh(
        xyz=xyz,
        rgb=np.clip(rgb, 0, 255).astype(np.uint8),
        nyu40=label.astype(np.uint8),
        category=category,
        axis_alignment=read_axis_alignment(paths["meta"]),
        source_files={p.name: p.stat().st_size for p in paths.values()},
    )
