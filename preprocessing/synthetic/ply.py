"""Binary little-endian PLY writer for ScanNet-style meshes (vectorised, no per-face Python objects)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_ply(path: Path, xyz: np.ndarray, rgba: np.ndarray, faces: np.ndarray,
              label: np.ndarray | None = None) -> None:
    """Write vertices (x y z float, red green blue alpha uchar[, label ushort]) and triangle faces.

    The header matches ScanNet's `_vh_clean_2.ply` / `_vh_clean_2.labels.ply`
    (`property list uchar int vertex_indices`). Written to a temporary name, then renamed.
    """
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
              ("alpha", "u1")]
    if label is not None:
        fields.append(("label", "<u2"))
    vertex = np.empty(len(xyz), dtype=fields)
    for i, axis in enumerate("xyz"):
        vertex[axis] = xyz[:, i]
    for i, channel in enumerate(("red", "green", "blue", "alpha")):
        vertex[channel] = rgba[:, i]
    if label is not None:
        vertex["label"] = label
    face = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"] = 3
    face["v"] = faces
    props = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    header = ["ply", "format binary_little_endian 1.0", "comment VCGLIB generated",
              f"element vertex {len(vertex)}"]
    header += [f"property {props[t]} {name}" for name, t in fields]
    header += [f"element face {len(face)}", "property list uchar int vertex_indices", "end_header"]
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertex.tobytes())
        f.write(face.tobytes())
    os.replace(tmp, path)
