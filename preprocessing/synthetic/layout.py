"""Random but plausible room layouts: furniture against walls, on the floor, on other furniture.

Layouts are built in a room frame (x in [0, W], y in [0, D], z up, floor at z = 0) and turned
into a `SceneGeometry` in the raw frame by a rotation about z plus a translation (as real scans are
not axis-aligned). Everything depends only on the random generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from preprocessing.synthetic.categories import CATEGORIES
from preprocessing.synthetic.geometry import SceneGeometry, SceneObject, rot_z

Range = tuple[float, float]


@dataclass(frozen=True)
class Item:
    """How to size and place one kind of object."""

    size: tuple[Range, Range, Range]  # width (along a wall), depth, height in metres
    place: str  # "wall" | "floor" | "mount" | "on" | "around"
    shape: str = "box"  # box | table | desk | chair | couch | bed | toilet
    z0: Range = (0.0, 0.0)  # bottom height of wall-mounted items
    on: tuple[str, ...] = ()  # parents for "on" (surfaces) and "around" (tables to sit at)


ITEMS: dict[str, Item] = {
    "couch": Item(((1.8, 2.3), (0.85, 1.0), (0.8, 0.9)), "wall", "couch"),
    "armchair": Item(((0.8, 0.9), (0.8, 0.9), (0.8, 0.95)), "floor", "couch"),
    "coffee table": Item(((0.9, 1.2), (0.5, 0.7), (0.4, 0.5)), "floor", "table"),
    "dining table": Item(((1.2, 1.6), (0.8, 1.0), (0.72, 0.78)), "floor", "table"),
    "table": Item(((1.0, 1.4), (0.6, 0.9), (0.72, 0.76)), "floor", "table"),
    "end table": Item(((0.45, 0.55), (0.45, 0.55), (0.5, 0.6)), "wall", "table"),
    "chair": Item(((0.42, 0.5), (0.42, 0.5), (0.85, 0.95)), "around", "chair",
                  on=("dining table", "table", "desk")),
    "office chair": Item(((0.55, 0.65), (0.55, 0.65), (0.9, 1.05)), "around", "chair", on=("desk", "table")),
    "stool": Item(((0.35, 0.4), (0.35, 0.4), (0.6, 0.75)), "floor"),
    "ottoman": Item(((0.5, 0.7), (0.5, 0.7), (0.4, 0.45)), "floor"),
    "bookshelf": Item(((0.8, 1.2), (0.3, 0.4), (1.6, 2.0)), "wall"),
    "cabinet": Item(((1.0, 1.4), (0.45, 0.5), (0.6, 0.9)), "wall"),
    "kitchen cabinet": Item(((1.0, 1.8), (0.55, 0.6), (0.85, 0.9)), "wall"),
    "counter": Item(((1.2, 2.0), (0.6, 0.65), (0.88, 0.92)), "wall"),
    "refrigerator": Item(((0.7, 0.8), (0.65, 0.7), (1.7, 1.85)), "wall"),
    "wardrobe": Item(((1.0, 1.5), (0.55, 0.65), (1.9, 2.1)), "wall"),
    "dresser": Item(((1.0, 1.4), (0.45, 0.55), (0.8, 1.0)), "wall"),
    "nightstand": Item(((0.45, 0.55), (0.4, 0.45), (0.5, 0.6)), "wall"),
    "bed": Item(((1.4, 1.8), (1.9, 2.1), (0.5, 0.6)), "wall", "bed"),
    "desk": Item(((1.2, 1.6), (0.6, 0.8), (0.72, 0.76)), "wall", "desk"),
    "file cabinet": Item(((0.48, 0.55), (0.6, 0.65), (0.7, 1.0)), "wall"),
    "toilet": Item(((0.4, 0.45), (0.65, 0.7), (0.75, 0.8)), "wall", "toilet"),
    "bathtub": Item(((1.5, 1.7), (0.7, 0.8), (0.5, 0.6)), "wall"),
    "sink": Item(((0.5, 0.7), (0.45, 0.55), (0.8, 0.9)), "wall"),
    "radiator": Item(((0.8, 1.2), (0.1, 0.12), (0.5, 0.6)), "wall"),
    "trash can": Item(((0.3, 0.35), (0.3, 0.35), (0.4, 0.6)), "floor"),
    "plant": Item(((0.35, 0.5), (0.35, 0.5), (0.6, 1.0)), "floor"),
    "box": Item(((0.3, 0.6), (0.3, 0.6), (0.25, 0.5)), "floor"),
    "object": Item(((0.2, 0.4), (0.2, 0.4), (0.2, 0.4)), "floor"),
    "backpack": Item(((0.28, 0.32), (0.18, 0.22), (0.4, 0.48)), "floor"),
    "picture": Item(((0.4, 0.9), (0.03, 0.03), (0.3, 0.7)), "mount", z0=(1.2, 1.5)),
    "window": Item(((0.9, 1.6), (0.05, 0.05), (1.0, 1.3)), "mount", z0=(0.8, 1.0)),
    "curtain": Item(((0.6, 1.2), (0.08, 0.08), (1.9, 2.2)), "mount", z0=(0.25, 0.35)),
    "door": Item(((0.8, 0.95), (0.05, 0.05), (2.0, 2.1)), "mount", z0=(0.0, 0.0)),
    "whiteboard": Item(((1.2, 2.0), (0.03, 0.03), (0.9, 1.1)), "mount", z0=(0.9, 1.0)),
    "mirror": Item(((0.4, 0.7), (0.03, 0.03), (0.6, 0.9)), "mount", z0=(1.0, 1.3)),
    "towel": Item(((0.3, 0.5), (0.05, 0.05), (0.5, 0.8)), "mount", z0=(0.8, 1.1)),
    "shower curtain": Item(((1.2, 1.6), (0.04, 0.04), (1.7, 1.9)), "mount", z0=(0.2, 0.3)),
    "tv": Item(((0.7, 0.95), (0.08, 0.12), (0.45, 0.6)), "on", on=("cabinet", "dresser")),
    "lamp": Item(((0.2, 0.3), (0.2, 0.3), (0.35, 0.5)), "on", on=("end table", "nightstand", "desk")),
    "monitor": Item(((0.5, 0.6), (0.15, 0.2), (0.35, 0.45)), "on", on=("desk",)),
    "keyboard": Item(((0.42, 0.46), (0.13, 0.16), (0.03, 0.03)), "on", on=("desk",)),
    "laptop": Item(((0.32, 0.35), (0.22, 0.24), (0.02, 0.03)), "on", on=("table", "desk", "dining table")),
    "printer": Item(((0.36, 0.42), (0.3, 0.38), (0.22, 0.28)), "on", on=("file cabinet", "cabinet", "table")),
    "microwave": Item(((0.45, 0.5), (0.35, 0.4), (0.28, 0.3)), "on", on=("counter", "kitchen cabinet")),
    "pillow": Item(((0.4, 0.6), (0.3, 0.4), (0.12, 0.18)), "on", on=("bed", "couch", "armchair")),
    "clothes": Item(((0.4, 0.6), (0.3, 0.5), (0.05, 0.1)), "on", on=("bed",)),
    "book": Item(((0.15, 0.25), (0.2, 0.3), (0.03, 0.06)), "on", on=("coffee table", "desk", "table")),
}

# room type -> (sceneType, room size ranges (W, D, H), [(category, min count, max count, probability)])
ROOM_TYPES: dict[str, tuple[str, tuple[Range, Range, Range], list[tuple[str, int, int, float]]]] = {
    "living": ("Living room / Lounge", ((6.0, 7.0), (5.0, 5.8), (2.6, 2.9)), [
        ("door", 1, 1, 1), ("window", 1, 2, 1), ("curtain", 1, 1, 1), ("couch", 1, 1, 1),
        ("refrigerator", 1, 1, 1), ("counter", 1, 1, 1), ("bookshelf", 1, 1, 1), ("cabinet", 1, 1, 1),
        ("tv", 1, 1, 1), ("dining table", 1, 1, 1), ("chair", 2, 4, 1), ("coffee table", 1, 1, 1),
        ("ottoman", 1, 1, 1), ("picture", 1, 2, 1), ("armchair", 1, 1, 0.8), ("end table", 1, 1, 0.8),
        ("lamp", 1, 1, 0.9), ("plant", 1, 1, 0.7), ("pillow", 1, 2, 0.8), ("book", 1, 2, 0.5),
        ("object", 1, 1, 0.6)]),
    "bedroom_bath": ("Bedroom / Hotel", ((6.0, 7.0), (5.0, 5.8), (2.5, 2.8)), [
        ("door", 1, 1, 1), ("window", 1, 1, 1), ("shower curtain", 1, 1, 1), ("bed", 1, 1, 1),
        ("bathtub", 1, 1, 1), ("toilet", 1, 1, 1), ("sink", 1, 1, 1), ("desk", 1, 1, 1),
        ("chair", 1, 1, 1), ("wardrobe", 1, 1, 1), ("dresser", 1, 1, 1), ("nightstand", 1, 2, 1),
        ("lamp", 1, 1, 1), ("pillow", 1, 2, 1), ("mirror", 1, 1, 1), ("towel", 1, 2, 1),
        ("curtain", 1, 1, 0.8), ("picture", 1, 1, 0.7), ("clothes", 1, 1, 0.5), ("backpack", 1, 1, 0.5),
        ("object", 1, 1, 0.5)]),
    "office": ("Office", ((5.0, 6.5), (4.5, 5.5), (2.6, 3.0)), [
        ("door", 1, 1, 1), ("window", 1, 2, 1), ("whiteboard", 1, 1, 1), ("desk", 2, 2, 1),
        ("office chair", 2, 2, 1), ("monitor", 1, 2, 1), ("keyboard", 1, 1, 1), ("bookshelf", 1, 1, 1),
        ("file cabinet", 1, 1, 1), ("printer", 1, 1, 1), ("trash can", 1, 1, 1), ("table", 1, 1, 1),
        ("chair", 2, 2, 1), ("laptop", 1, 1, 0.5), ("box", 1, 2, 0.7), ("plant", 1, 1, 0.6),
        ("radiator", 1, 1, 0.6), ("picture", 1, 1, 0.5), ("backpack", 1, 1, 0.4)]),
    "kitchen": ("Kitchen", ((4.5, 5.5), (4.0, 5.0), (2.5, 2.8)), [
        ("door", 1, 1, 1), ("window", 1, 1, 1), ("refrigerator", 1, 1, 1), ("kitchen cabinet", 1, 2, 1),
        ("counter", 1, 1, 1), ("sink", 1, 1, 1), ("microwave", 1, 1, 1), ("dining table", 1, 1, 1),
        ("chair", 2, 3, 1), ("stool", 1, 2, 0.7), ("trash can", 1, 1, 0.8), ("picture", 1, 1, 0.5),
        ("radiator", 1, 1, 0.5), ("object", 1, 1, 0.5)]),
    "bathroom": ("Bathroom", ((4.0, 4.6), (3.8, 4.3), (2.4, 2.7)), [
        ("door", 1, 1, 1), ("toilet", 1, 1, 1), ("sink", 1, 1, 1), ("bathtub", 1, 1, 1),
        ("shower curtain", 1, 1, 1), ("mirror", 1, 1, 1), ("towel", 1, 2, 1), ("cabinet", 1, 1, 0.8),
        ("trash can", 1, 1, 0.8), ("window", 1, 1, 0.5)]),
    "conference": ("Conference Room", ((5.5, 7.0), (4.5, 5.5), (2.7, 3.0)), [
        ("door", 1, 1, 1), ("window", 1, 2, 1), ("whiteboard", 1, 1, 1), ("table", 1, 1, 1),
        ("chair", 3, 4, 1), ("cabinet", 1, 1, 1), ("tv", 1, 1, 1), ("plant", 1, 1, 0.7),
        ("trash can", 1, 1, 0.7), ("laptop", 1, 2, 0.6), ("radiator", 1, 1, 0.5)]),
}
# The first three cover all 20 ScanNet20 classes (NYU40 incl. otherfurniture); then the cycle goes on.
ROOM_CYCLE = ("living", "bedroom_bath", "office", "kitchen", "bathroom", "conference")

Part = tuple[tuple[float, float, float], tuple[float, float, float]]  # local centre, half extents


def parts(shape: str, w: float, d: float, h: float) -> list[Part]:
    """Boxes of one object in its local frame (origin at the footprint centre, +y = front)."""
    if shape == "table":
        legs = [((sx * (w / 2 - 0.04), sy * (d / 2 - 0.04), (h - 0.04) / 2), (0.025, 0.025, (h - 0.04) / 2))
                for sx in (-1, 1) for sy in (-1, 1)]
        return [((0.0, 0.0, h - 0.02), (w / 2, d / 2, 0.02)), *legs]
    if shape == "desk":
        sides = [((sx * (w / 2 - 0.015), 0.0, (h - 0.03) / 2), (0.015, d / 2, (h - 0.03) / 2))
                 for sx in (-1, 1)]
        return [((0.0, 0.0, h - 0.015), (w / 2, d / 2, 0.015)), *sides]
    if shape == "chair":
        legs = [((sx * (w / 2 - 0.03), sy * (d / 2 - 0.03), 0.2075), (0.018, 0.018, 0.2075))
                for sx in (-1, 1) for sy in (-1, 1)]
        back = ((0.0, -d / 2 + 0.025, (0.465 + h) / 2), (w / 2, 0.025, (h - 0.465) / 2))
        return [((0.0, 0.0, 0.44), (w / 2, d / 2, 0.025)), *legs, back]
    if shape == "couch":
        arms = [((sx * (w / 2 - 0.08), 0.1, 0.31), (0.08, d / 2 - 0.1, 0.31)) for sx in (-1, 1)]
        back = ((0.0, -d / 2 + 0.1, h / 2), (w / 2, 0.1, h / 2))
        return [((0.0, 0.0, 0.21), (w / 2, d / 2, 0.21)), back, *arms]
    if shape == "bed":
        return [((0.0, 0.0, h / 2), (w / 2, d / 2, h / 2)), ((0.0, -d / 2 + 0.03, 0.5), (w / 2, 0.03, 0.5))]
    if shape == "toilet":
        tank = ((0.0, -d / 2 + 0.1, h / 2), (w / 2, 0.1, h / 2))
        return [tank, ((0.0, 0.1, 0.2), (w * 0.4, d / 2 - 0.1, 0.2))]
    return [((0.0, 0.0, h / 2), (w / 2, d / 2, h / 2))]


@dataclass
class Placed:
    """An object placed in the room frame."""

    category: str
    center: np.ndarray  # footprint centre (x, y) and bottom z
    yaw: float
    size: tuple[float, float, float]
    shape: str
    place: str
    annotated: bool = True
    color: tuple[float, float, float] = (128.0, 128.0, 128.0)
    lo: np.ndarray = field(default=None)  # AABB used for overlap tests
    hi: np.ndarray = field(default=None)

    def boxes(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """(centre, half extents, yaw) of each part in the room frame."""
        rot = rot_z(self.yaw)
        return [(self.center + rot @ np.array(c), np.array(hh), self.yaw)
                for c, hh in parts(self.shape, *self.size)]

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre and half extents (local) of the top surface for objects placed on this one."""
        c, hh = parts(self.shape, *self.size)[0]
        return np.array([c[0], c[1], c[2] + hh[2]]), np.array(hh)


def aabb(center: np.ndarray, yaw: float, size: tuple[float, float, float], grow_front: float = 0.0):
    w, d, h = size
    local = np.array([[sx * w / 2, sy * d / 2 + (grow_front if sy > 0 else 0.0)]
                      for sx in (-1, 1) for sy in (-1, 1)])
    xy = local @ rot_z(yaw)[:2, :2].T + center[:2]
    return (np.array([*xy.min(0), center[2]]), np.array([*xy.max(0), center[2] + h]))


WALL_YAWS = (0.0, np.pi / 2, np.pi, -np.pi / 2)  # walls y=0, x=W, y=D, x=0: front (+y local) faces inwards


class LayoutError(RuntimeError):
    """No valid layout was found for the requested room."""


def layout_room(room_type: str, rng: np.random.Generator, max_tries: int = 30):
    """Place the objects of one room type. Returns (sceneType, (W, D, H), [Placed])."""
    scene_type, size_ranges, recipe = ROOM_TYPES[room_type]
    for _ in range(max_tries):
        dims = tuple(float(rng.uniform(*r)) for r in size_ranges)
        placed = try_layout(recipe, dims, rng)
        if placed is not None:
            return scene_type, dims, placed
    raise LayoutError(f"could not lay out a {room_type} room in {max_tries} tries")


def try_layout(recipe, dims, rng, fixed: list[Placed] | None = None) -> list[Placed] | None:
    """One attempt at placing `recipe` around the `fixed` objects; None if a required one did not fit."""
    placed: list[Placed] = list(fixed or [])
    for category, lo, hi, prob in recipe:
        if prob < 1 and rng.random() > prob:
            continue
        count = int(rng.integers(lo, hi + 1))
        for k in range(count):
            obj = _place(category, ITEMS[category], dims, placed, rng)
            if obj is None:
                if prob >= 1 and k < lo:
                    return None  # a required object did not fit: start over
                break
            placed.append(obj)
    return placed


def _fits(lo, hi, placed: list[Placed], dims, pad: float = 0.0) -> bool:
    width, depth, height = dims
    if min(lo[0], lo[1]) < -1e-6 or hi[0] > width + 1e-6 or hi[1] > depth + 1e-6 or hi[2] > height - 0.05:
        return False
    for other in placed:
        if np.all(lo - pad < other.hi - 1e-6) and np.all(hi + pad > other.lo + 1e-6):
            return False
    return True


def _place(category: str, item: Item, dims, placed: list[Placed], rng) -> Placed | None:
    width, depth, height = dims
    for _ in range(60):
        size = tuple(float(rng.uniform(*r)) for r in item.size)
        w, d, h = size
        grow = 0.0
        if item.place in ("wall", "mount"):
            wall = int(rng.integers(4))
            yaw = WALL_YAWS[wall]
            length = width if wall in (0, 2) else depth
            if length < w + 0.1:
                continue
            s = rng.uniform(w / 2 + 0.05, length - w / 2 - 0.05)
            z = float(rng.uniform(*item.z0)) if item.place == "mount" else 0.0
            off = d / 2
            xy = {0: (s, off), 1: (width - off, s), 2: (width - s, depth - off), 3: (off, depth - s)}[wall]
            center = np.array([xy[0], xy[1], z])
            grow = 0.8 if category == "door" else 0.0
        elif item.place == "floor":
            yaw = float(rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.3))
            center = np.array([rng.uniform(0.3, width - 0.3), rng.uniform(0.3, depth - 0.3), 0.0])
        elif item.place == "on":
            parents = [p for p in placed if p.category in item.on]
            if not parents:
                return None
            parent = parents[int(rng.integers(len(parents)))]
            top_c, top_h = parent.top()
            room_x = top_h[0] - w / 2 - 0.02
            room_y = top_h[1] - d / 2 - 0.02
            if room_x < 0 or room_y < 0:
                continue
            local = np.array([rng.uniform(-room_x, room_x) + top_c[0],
                              rng.uniform(-room_y, room_y) + top_c[1], 0.0])
            yaw = parent.yaw + float(rng.normal(0, 0.15))
            center = parent.center + rot_z(parent.yaw) @ local
            center[2] = parent.center[2] + top_c[2]
        else:  # around: a chair at one side of a table, facing it
            parents = [p for p in placed if p.category in item.on]
            if not parents:
                return None
            parent = parents[int(rng.integers(len(parents)))]
            pw, pd, _ = parent.size
            sides = [(0.0, 1.0)]
            if parent.place != "wall":
                sides += [(0.0, -1.0), (1.0, 0.0), (-1.0, 0.0)]
            sx, sy = sides[int(rng.integers(len(sides)))]
            along = rng.uniform(-0.3, 0.3) * (pw if sx == 0 else pd)
            dist = (pd / 2 if sx == 0 else pw / 2) + d / 2 + 0.02
            local = np.array([sx * dist + (along if sx == 0 else 0.0),
                              sy * dist + (along if sy == 0 else 0.0), 0.0])
            center = parent.center + rot_z(parent.yaw) @ local
            center[2] = 0.0
            direction = rot_z(parent.yaw)[:2, :2] @ np.array([-sx, -sy])
            # the chair's front (+y local) faces the table
            yaw = float(np.arctan2(-direction[0], direction[1]) + rng.normal(0, 0.1))
        lo, hi = aabb(center, yaw, size, grow)
        if item.place in ("floor", "around") and hi[2] > 1.15:
            continue  # the camera path (1.35 m and up) stays free above the middle of the room
        if item.place == "on" and hi[2] > 1.25 and parent.place != "wall":
            continue
        if item.place in ("on", "around"):
            ok = _fits(lo, hi, [p for p in placed if p is not parent], dims)
        else:
            ok = _fits(lo, hi, placed, dims, pad=0.02)
        if not ok:
            continue
        tint = np.array(CATEGORIES[category].color) * rng.uniform(0.85, 1.15, 3)
        color = tuple(float(v) for v in np.clip(tint, 0, 255))
        return Placed(category, center, float(yaw), size, item.shape, item.place, category != "object", color,
                      lo, hi)
    return None


def build_geometry(dims, placed: list[Placed], yaw: float, offset: np.ndarray,
                   structure: dict[str, str] | None = None, structure_colors: dict[str, tuple] | None = None
                   ) -> SceneGeometry:
    """Room frame -> raw frame: rotate by `yaw` about z and translate by `offset`.

    Object ids: walls (y=0, x=W, y=D, x=0) are 0..3, floor 4, ceiling 5, then `placed` in order.
    `structure` renames the room surfaces' categories (e.g. for S3DIS).
    """
    names = {"wall": "wall", "floor": "floor", "ceiling": "ceiling", **(structure or {})}
    colors = structure_colors or {k: CATEGORIES[k].color for k in ("wall", "floor", "ceiling")}
    width, depth, height = dims
    rot = rot_z(yaw)
    objects = [SceneObject(i, names["wall"], tuple(float(c) for c in colors["wall"])) for i in range(4)]
    objects.append(SceneObject(4, names["floor"], tuple(float(c) for c in colors["floor"])))
    objects.append(SceneObject(5, names["ceiling"], tuple(float(c) for c in colors["ceiling"])))
    centers, halves, yaws, owner, resting = [], [], [], [], []
    for i, obj in enumerate(placed):
        oid = 6 + i
        objects.append(SceneObject(oid, obj.category, obj.color, obj.annotated))
        for c, h, y in obj.boxes():
            centers.append(rot @ c + offset)
            halves.append(h)
            yaws.append(y + yaw)
            owner.append(oid)
            resting.append(obj.place == "on" or abs(c[2] - h[2]) < 1e-6)
    # room local axes: x (walls x=0 -> id 3, x=W -> id 1), y (y=0 -> 0, y=D -> 2), z (floor 4, ceiling 5)
    room_faces = np.array([[3, 1], [0, 2], [4, 5]])
    room_center = rot @ np.array([width / 2, depth / 2, height / 2]) + offset
    return SceneGeometry(room_center=room_center, room_half=np.array([width / 2, depth / 2, height / 2]),
                         room_yaw=float(yaw), room_faces=room_faces,
                         centers=np.array(centers).reshape(-1, 3), halves=np.array(halves).reshape(-1, 3),
                         yaws=np.array(yaws), box_object=np.array(owner, dtype=np.int64), objects=objects,
                         resting=np.array(resting, bool))
