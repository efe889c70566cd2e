"""Synthetic rooms in the raw Stanford3dDataset_v1.2 layout (S3DIS).

`write_s3dis` writes OUT/Stanford3dDataset_v1.2/Area_N/<room>/<room>.txt and
<room>/Annotations/<class>_<k>.txt, lines `x y z r g b` (6-decimal floats, integer colours), for
the 13 S3DIS classes. Rooms alternate between Area_1 and Area_5 (the usual test area). The room
geometry comes from `s3dis_room(seed, index)` (a `SceneGeometry`), so 2D-3D-S-style views can be
ray-cast from the same rooms later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from preprocessing.synthetic.files import check_out_dir, fresh_temp_dir, move_into_place
from preprocessing.synthetic.s3dis_rooms import (
    S3DISRoomSpec,
    format_points,
    s3dis_room,
)
from preprocessing.synthetic.s3dis_views import write_views
from storage.errors import InputError


def write_room(spec: S3DISRoomSpec, room_dir: Path, spacing: float, seed: int, index: int) -> int:
    """Write one room's annotation files and concatenated room file; returns the point count."""
    geo = spec.geometry
    rng = np.random.default_rng([seed, index, 11])
    surf = geo.surface_grid(spacing, jitter=rng)
    rgb = geo.colors(surf.xyz, surf.normal, surf.object_id) + rng.normal(0, 4.0, surf.xyz.shape)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.int64)
    (room_dir / "Annotations").mkdir(parents=True)
    counters: dict[str, int] = {}
    chunks = []
    for obj in geo.objects:
        mask = surf.object_id == obj.object_id
        if not mask.any():
            continue
        counters[obj.category] = counters.get(obj.category, 0) + 1
        text = format_points(surf.xyz[mask], rgb[mask])
        (room_dir / "Annotations" / f"{obj.category}_{counters[obj.category]}.txt").write_text(text)
        chunks.append(text)
    (room_dir / f"{spec.name}.txt").write_text("".join(chunks))
    return len(surf.xyz)


def write_s3dis(out_dir: Path, rooms: int = 2, seed: int = 0, spacing: float = 0.06,
                progress: bool = True, views: bool = False, view_size: int = 1080) -> list[str]:
    """Write `rooms` synthetic rooms under OUT/Stanford3dDataset_v1.2; returns `Area_N/room` ids.

    Each room is written into a temporary directory and renamed when complete. With `views`, the
    rooms' Stanford 2D-3D-S views (`view_size` square) follow (`synthetic.s3dis_views`).
    """
    out_dir = check_out_dir(out_dir, "Stanford3dDataset_v1.2", rooms, "rooms", seed)
    if views and view_size < 16:
        raise InputError(f"--view-size must be at least 16 pixels (got {view_size})")
    root = out_dir / "Stanford3dDataset_v1.2"
    ids = []
    for index in tqdm(range(rooms), desc="synthetic S3DIS", unit="room", disable=not progress):
        spec = s3dis_room(seed, index)
        area_dir = root / spec.area
        area_dir.mkdir(parents=True, exist_ok=True)
        tmp = fresh_temp_dir(area_dir, spec.name)
        write_room(spec, tmp, spacing, seed, index)
        move_into_place(tmp, area_dir / spec.name)
        ids.append(spec.room_id)
    if views:

        write_views(out_dir, rooms, seed=seed, size=view_size, progress=progress)
    return ids
