"""Synthetic S3DIS rooms: the 13 classes, room recipes and `s3dis_room(seed, index)` geometry.

Both the raw-release writer (`synthetic.s3dis`) and the 2D-3D-S view renderer
(`synthetic.s3dis_views`) build on these specs, so views are ray-cast from the same rooms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from preprocessing.synthetic.geometry import SceneGeometry
from preprocessing.synthetic.layout import LayoutError, Placed, aabb, build_geometry, try_layout

S3DIS_CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
                 "bookcase", "board", "clutter")
TO_S3DIS = {"desk": "table", "table": "table", "dining table": "table", "coffee table": "table",
            "chair": "chair", "office chair": "chair", "armchair": "chair", "couch": "sofa",
            "bookshelf": "bookcase", "whiteboard": "board", "window": "window", "door": "door",
            "beam": "beam", "column": "column", "wall": "wall", "floor": "floor", "ceiling": "ceiling"}
STRUCTURE_COLORS = {"wall": (190, 185, 170), "floor": (120, 120, 115), "ceiling": (225, 225, 220)}

# room type -> (room size ranges (W, D, H), recipe as in layout.ROOM_TYPES)
S3DIS_ROOMS = {
    "office": (((4.5, 6.0), (4.0, 5.0), (2.9, 3.2)), [
        ("door", 1, 1, 1), ("window", 1, 1, 1), ("whiteboard", 1, 1, 1), ("desk", 1, 2, 1),
        ("office chair", 1, 2, 1), ("bookshelf", 1, 2, 1), ("table", 1, 1, 1), ("chair", 1, 2, 1),
        ("couch", 1, 1, 1), ("monitor", 1, 1, 0.8), ("trash can", 1, 1, 0.8), ("box", 1, 2, 0.8),
        ("plant", 1, 1, 0.5)]),
    "conferenceRoom": (((5.5, 7.0), (4.5, 5.5), (2.9, 3.2)), [
        ("door", 1, 1, 1), ("window", 1, 2, 1), ("whiteboard", 1, 1, 1), ("dining table", 1, 1, 1),
        ("chair", 3, 5, 1), ("bookshelf", 1, 1, 1), ("couch", 1, 1, 0.6), ("plant", 1, 1, 0.7),
        ("laptop", 1, 2, 0.7)]),
    "hallway": (((8.0, 10.0), (2.6, 3.0), (2.9, 3.1)), [
        ("door", 2, 3, 1), ("bookshelf", 1, 1, 0.6), ("whiteboard", 1, 1, 0.5), ("window", 1, 1, 0.5),
        ("box", 1, 2, 0.8), ("trash can", 1, 1, 0.6)]),
    "lounge": (((5.0, 6.5), (4.5, 5.5), (2.9, 3.2)), [
        ("door", 1, 1, 1), ("window", 1, 2, 1), ("couch", 1, 2, 1), ("coffee table", 1, 1, 1),
        ("armchair", 1, 2, 1), ("bookshelf", 1, 1, 1), ("plant", 1, 1, 0.8), ("picture", 1, 1, 0.6)]),
    "storage": (((3.8, 4.5), (3.8, 4.2), (2.9, 3.1)), [
        ("door", 1, 1, 1), ("bookshelf", 2, 3, 1), ("box", 2, 4, 1), ("table", 1, 1, 0.6),
        ("chair", 1, 1, 0.5)]),
    "pantry": (((4.0, 5.0), (3.8, 4.5), (2.9, 3.1)), [
        ("door", 1, 1, 1), ("counter", 1, 1, 1), ("refrigerator", 1, 1, 1), ("table", 1, 1, 1),
        ("chair", 2, 3, 1), ("microwave", 1, 1, 0.8), ("window", 1, 1, 0.6)]),
}
ROOM_ORDER = ("office", "conferenceRoom", "hallway", "lounge", "storage", "pantry")
AREAS = (1, 5)


@dataclass
class S3DISRoomSpec:
    """One synthetic S3DIS room: its id (Area_N/name) and geometry (object categories = S3DIS classes)."""

    area: str
    name: str
    geometry: SceneGeometry

    @property
    def room_id(self) -> str:
        return f"{self.area}/{self.name}"


def s3dis_room(seed: int, index: int) -> S3DISRoomSpec:
    """Rebuild room `index` of `write_s3dis(..., seed=seed)` deterministically."""
    room_type = ROOM_ORDER[index % len(ROOM_ORDER)]
    area = f"Area_{AREAS[index % len(AREAS)]}"
    # rooms of the same type in the same area are numbered 1, 2, ...
    number = sum(1 for j in range(index) if ROOM_ORDER[j % len(ROOM_ORDER)] == room_type
                 and AREAS[j % len(AREAS)] == AREAS[index % len(AREAS)]) + 1
    rng = np.random.default_rng([seed, index, 10])
    size_ranges, recipe = S3DIS_ROOMS[room_type]
    for _ in range(30):
        dims = tuple(float(rng.uniform(*r)) for r in size_ranges)
        placed = try_layout(recipe, dims, rng, fixed=_beams_and_columns(dims, rng))
        if placed is not None:
            break
    else:
        raise LayoutError(f"could not lay out S3DIS room {room_type}")
    yaw = float(rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.02))
    offset = np.array([index * 12.0 + rng.uniform(-2, 2), rng.uniform(-5, 40), rng.uniform(-0.1, 0.1)])
    geometry = build_geometry(dims, placed, yaw, offset, structure_colors=STRUCTURE_COLORS)
    geometry.objects = [replace(o, category=TO_S3DIS.get(o.category, "clutter"), annotated=True)
                        for o in geometry.objects]
    return S3DISRoomSpec(area, f"{room_type}_{number}", geometry)


def _beams_and_columns(dims, rng: np.random.Generator) -> list[Placed]:
    """A ceiling beam across the room and a column against a wall (S3DIS has both classes)."""
    width, depth, height = dims
    bw, bh = rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45)
    beam = Placed("beam", np.array([width / 2, rng.uniform(0.3 * depth, 0.7 * depth), height - bh]), 0.0,
                  (width, bw, bh), "box", "mount", color=(200.0, 195.0, 185.0))
    cw, cd = rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.5)
    column = Placed("column", np.array([cw / 2, cd / 2, 0.0]), 0.0, (cw, cd, height), "box", "wall",
                    color=(180.0, 178.0, 170.0))
    for obj in (beam, column):
        obj.lo, obj.hi = aabb(obj.center, obj.yaw, obj.size)
    return [beam, column]


def format_points(xyz: np.ndarray, rgb: np.ndarray) -> str:
    rows = np.concatenate([xyz.astype(np.float64), rgb.astype(np.float64)], 1)
    return ("%.6f %.6f %.6f %d %d %d\n" * len(rows)) % tuple(rows.ravel())
