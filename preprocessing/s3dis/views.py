"""Stanford 2D-3D-S camera views for S3DIS rooms: index, decode, and move into the points' frame.

2D-3D-S ships the RGB-D views of the same building as S3DIS, one directory per area::

    <views>/area_N/data/rgb/camera_<id>_<room>_frame_<k>_domain_rgb.png
    <views>/area_N/data/depth/camera_<id>_<room>_frame_<k>_domain_depth.png
    <views>/area_N/data/pose/camera_<id>_<room>_frame_<k>_domain_pose.json

RGB is 1080x1080; depth is 16-bit z-depth, 1/512 m per unit, 65535 = no depth; the pose JSON holds
``camera_k_matrix`` (3x3) and ``camera_rt_matrix`` (3x4, world->camera, OpenCV axes).

Areas are ``area_1`` .. ``area_6`` with area 5 split into ``area_5a`` and ``area_5b``; both are S3DIS
``Area_5``. The room of a frame comes from its file name; frames are grouped per S3DIS room id
(``Area_5_office_3``), in (area directory, camera, frame number) order.

Coordinate frames (see docs/s3dis.md):
- the poses of an area are in that area's 2D-3D-S frame, which for every area but ``area_5b`` is
  the frame of the *non-aligned* S3DIS release (``Stanford3dDataset_v1.2``). ``area_5b`` has its
  own frame; ``AREA_TO_S3DIS['area_5b']`` maps it into Area_5 (the transform the Pointcept S3DIS
  preprocessing applies to the area_5b mesh, written in z-up coordinates).
- the *aligned* release (``Stanford3dDataset_v1.2_Aligned_Version``) rotates every room about the
  vertical axis through its bounding-box centre by minus the room's angle in
  ``Area_N/Area_N_alignmentAngle.txt`` (lines ``<room> <degrees>`` after ``##`` comment lines);
  ``alignment_transform`` is that map, applied to the poses so the stored points stay as read.

Per-frame problems (missing or malformed pose JSON, a depth PNG that is not 16-bit, unreadable
images) raise ``BadView`` with a short ``reason``; the caller counts them per room and goes on.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from preprocessing.captions import embed_captions, resolve_captions
from preprocessing.projection import Correspondences, prepare_points, project_points
from preprocessing.scannet.sens import rescale_intrinsic
from storage.errors import InputError
from storage.schema import DEPTH_SCALE

log = logging.getLogger(__name__)

AREAS: dict[str, str] = {
    "area_1": "Area_1", "area_2": "Area_2", "area_3": "Area_3", "area_4": "Area_4",
    "area_5a": "Area_5", "area_5b": "Area_5", "area_6": "Area_6",
}
DEPTH_UNITS_PER_M = 512.0
DEPTH_MISSING = 65535
NATIVE_SIZE = 1080
RAW_RELEASE = "Stanford3dDataset_v1.2"
ALIGNED_RELEASE = "Stanford3dDataset_v1.2_Aligned_Version"
FRAME_NAME = re.compile(r"camera_(?P<camera>[0-9A-Za-z]+)_(?P<room>.+)_frame_(?P<frame>\d+)"
                        r"_domain_(?P<domain>[a-z_]+)\.(?P<ext>png|json)")

# 2D-3D-S area frame -> S3DIS area frame (z up); identity where absent.
AREA_TO_S3DIS: dict[str, np.ndarray] = {
    "area_5b": np.array([[0.0, 1.0, 0.0, -4.09703582],
                         [-1.0, 0.0, 0.0, 6.22617759],
                         [0.0, 0.0, 1.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]]),
}


class BadView(InputError):
    """One unusable frame; ``reason`` is the counter name (``missing_pose``, ``depth_not_16bit``, ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ViewFiles:
    """The three files of one 2D-3D-S frame."""

    area_dir: str  # 2D-3D-S area directory name, e.g. area_5b
    room: str  # S3DIS room name, e.g. office_3
    camera: str
    frame: int
    rgb: Path
    depth: Path
    pose: Path

    @property
    def area(self) -> str:
        return AREAS[self.area_dir]

    @property
    def room_id(self) -> str:
        return f"{self.area}_{self.room}"

    @property
    def name(self) -> str:
        return f"{self.area_dir}/camera_{self.camera}_{self.room}_frame_{self.frame}"


@dataclass
class ViewIndex:
    """Frames per S3DIS room id, plus what was skipped while indexing and why."""

    rooms: dict[str, list[ViewFiles]]
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.messages.append(message)
        log.warning("%s", message)


@dataclass
class View:
    """One decoded frame at the output size; ``pose`` is camera_to_world in the points' frame."""

    files: ViewFiles
    pose: np.ndarray  # float64 [4,4]
    intrinsic: np.ndarray  # float32 [3,3] at the output size
    color: np.ndarray  # uint8 [H,W,3]
    depth: np.ndarray  # float32 [H,W] metres, 0 = no depth


def s3dis_area(area_dir: str) -> str:
    """``area_5a`` -> ``Area_5``; InputError for a name that is not a 2D-3D-S area."""
    if area_dir not in AREAS:
        raise InputError(f"{area_dir}: not a 2D-3D-S area (expected {', '.join(AREAS)})")
    return AREAS[area_dir]


def parse_frame_name(name: str) -> dict[str, str] | None:
    """Fields of ``camera_<id>_<room>_frame_<k>_domain_<kind>.png`` (None if it does not match)."""
    match = FRAME_NAME.fullmatch(name)
    return match.groupdict() if match else None


def _area_dirs(views_dir: Path) -> list[Path]:
    views_dir = resolve_views_dir(views_dir)
    if views_dir.name.lower().startswith("area_") and (views_dir / "data").is_dir():
        return [views_dir]
    return sorted(p for p in views_dir.iterdir() if p.is_dir() and p.name.lower().startswith("area_"))


def index_views(views_dir: Path, rooms: Iterable[str] | None = None) -> ViewIndex:
    """Group the frames under ``views_dir`` (the 2D-3D-S root, or one area) by S3DIS room id.

    Counted skips (logged, listed in ``messages``): area directories that are not a 2D-3D-S area
    (``unknown_area``, per frame), file names that do not parse (``bad_name``) and, when ``rooms``
    is given, frames whose room has no point cloud (``no_point_cloud``).
    """
    views_dir = Path(views_dir)
    if not views_dir.is_dir():
        raise InputError(f"{views_dir}: views directory not found (expected the 2D-3D-S area_N/ layout)")
    areas = _area_dirs(views_dir)
    if not areas:
        raise InputError(f"{views_dir}: no area_N directories (expected area_N/data/rgb, depth, pose)")
    known = set(rooms) if rooms is not None else None
    index = ViewIndex(rooms={})
    for area in areas:
        rgb_files = sorted((area / "data" / "rgb").glob("*.png"))
        if area.name not in AREAS:
            index.skip("unknown_area", len(rgb_files), f"{area}: not a 2D-3D-S area (expected "
                       f"{', '.join(AREAS)}); {len(rgb_files)} frames skipped")
            continue
        if not rgb_files:
            index.messages.append(f"{area}: no frames in data/rgb")
            log.warning("%s", index.messages[-1])
            continue
        orphans: dict[str, int] = {}
        for rgb in rgb_files:
            fields = parse_frame_name(rgb.name)
            if fields is None or fields["domain"] != "rgb":
                index.skip("bad_name", 1, f"{rgb}: not a 2D-3D-S frame name "
                           "(camera_<id>_<room>_frame_<k>_domain_rgb.png)")
                continue
            stem = rgb.name[: -len("_domain_rgb.png")]
            files = ViewFiles(area.name, fields["room"], fields["camera"], int(fields["frame"]), rgb,
                              area / "data" / "depth" / f"{stem}_domain_depth.png",
                              area / "data" / "pose" / f"{stem}_domain_pose.json")
            if known is not None and files.room_id not in known:
                orphans[files.room_id] = orphans.get(files.room_id, 0) + 1
                continue
            index.rooms.setdefault(files.room_id, []).append(files)
        for room_id, count in sorted(orphans.items()):
            index.skip("no_point_cloud", count, f"{area}: {count} frames of room {room_id}, which has no "
                       "point cloud in the S3DIS release; skipped")
    for frames in index.rooms.values():
        frames.sort(key=lambda f: (f.area_dir, f.camera, f.frame))
    return index


# ---------------------------------------------------------------------------------------------
# Coordinate frames


def read_alignment_angles(path: Path) -> dict[str, float]:
    """Room -> angle in degrees from ``Area_N_alignmentAngle.txt`` (``##`` lines are comments)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise InputError(f"{path}: cannot read the alignment angle file ({error.strerror})") from error
    angles = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            angles[parts[0]] = float(parts[1])
        except ValueError as error:
            raise InputError(f"{path}: line {number}: expected '<room> <degrees>', got {line[:60]!r}") \
                from error
    return angles


def rot_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def alignment_transform(angle_deg: float, center: np.ndarray) -> np.ndarray:
    """4x4 non-aligned -> aligned room frame: rotate by -angle about the vertical axis through ``center``."""
    T = np.eye(4)
    R = rot_z(-angle_deg)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(center, np.float64) - R @ np.asarray(center, np.float64)
    return T


def room_center(xyz: np.ndarray) -> np.ndarray:
    """Bounding-box centre (the alignment rotation centre; unchanged by rotations of 90 degrees)."""
    xyz = np.asarray(xyz, np.float64)
    return (xyz.min(0) + xyz.max(0)) / 2


def s3dis_release(room_dir: Path) -> str:
    """``aligned`` when the room lies under ``Stanford3dDataset_v1.2_Aligned_Version``, else ``raw``."""
    return "aligned" if any("aligned_version" in p.name.lower() for p in Path(room_dir).parents) else "raw"


def points_frame(area_dir: str, release: str, angle_deg: float | None, center: np.ndarray | None
                 ) -> np.ndarray:
    """4x4 from an area's 2D-3D-S frame to the frame of the room's points in ``release``."""
    T = AREA_TO_S3DIS.get(area_dir, np.eye(4))
    if release == "aligned":
        if angle_deg is None or center is None:
            raise ValueError("the aligned release needs the room's alignment angle and centre")
        T = alignment_transform(angle_deg, center) @ T
    return T


def room_alignment_angle(room_dir: Path) -> float:
    """The room's angle from its area's alignment file (InputError if missing)."""
    room_dir = Path(room_dir)
    area = room_dir.parent
    path = area / f"{area.name}_alignmentAngle.txt"
    angles = read_alignment_angles(path)
    if room_dir.name not in angles:
        raise InputError(f"{path}: no alignment angle for room {room_dir.name}")
    return angles[room_dir.name]


# ---------------------------------------------------------------------------------------------
# Decoding


def read_pose(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K float64[3,3] at the native size, camera_to_world float64[4,4] in the area frame)."""
    if not path.is_file():
        raise BadView(f"{path}: pose JSON not found", "missing_pose")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadView(f"{path}: not a valid pose JSON ({error})", "bad_pose") from error
    if not isinstance(data, dict):
        raise BadView(f"{path}: pose JSON is not an object", "bad_pose")
    out = []
    for key, shape in (("camera_k_matrix", (3, 3)), ("camera_rt_matrix", (3, 4))):
        if key not in data:
            raise BadView(f"{path}: pose JSON has no {key}", "bad_pose")
        try:
            value = np.asarray(data[key], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise BadView(f"{path}: {key} is not a numeric matrix", "bad_pose") from error
        if value.shape != shape or not np.isfinite(value).all():
            raise BadView(f"{path}: {key} must be a finite {shape[0]}x{shape[1]} matrix, got shape "
                          f"{value.shape}", "bad_pose")
        out.append(value)
    K, rt = out
    w2c = np.eye(4)
    w2c[:3] = rt
    if abs(np.linalg.det(rt[:, :3]) - 1.0) > 1e-3:
        raise BadView(f"{path}: camera_rt_matrix rotation is not orthonormal", "bad_pose")
    return K, np.linalg.inv(w2c)


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise BadView(f"{path}: {what} PNG not found", f"missing_{what}")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise BadView(f"{path}: cannot decode the {what} PNG ({error})", f"bad_{what}") from error
    return image


def _nearest_rows(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel centre (pixel-centre aligned, as ``rescale_intrinsic``)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def read_depth(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """float32 [H,W] metres at ``size`` (nearest sample, 0 = no depth) and the native (W, H)."""
    image = _open_image(path, "depth")
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise BadView(f"{path}: depth PNG is {image.mode!r}, expected 16-bit grayscale "
                      "(1/512 m per unit)", "depth_not_16bit")
    raw = np.asarray(image, dtype=np.int64)
    H0, W0 = raw.shape
    W, H = size
    raw = raw[_nearest_rows(H, H0)][:, _nearest_rows(W, W0)]
    depth = (raw / DEPTH_UNITS_PER_M).astype(np.float32)
    depth[(raw >= DEPTH_MISSING) | (raw <= 0)] = 0.0
    return depth, (W0, H0)


def read_color(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H,W,3] at ``size`` and the native (W, H)."""
    image = _open_image(path, "color")
    native = image.size
    image = image.convert("RGB")
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8), native


def read_view(files: ViewFiles, size: tuple[int, int], to_points: np.ndarray) -> View:
    """Decode one frame at ``size`` (W, H); ``to_points`` maps the area frame to the points' frame."""
    K, c2w = read_pose(files.pose)
    depth, depth_native = read_depth(files.depth, size)
    color, color_native = read_color(files.rgb, size)
    if depth_native != color_native:
        raise BadView(f"{files.depth}: depth is {depth_native[0]}x{depth_native[1]}, colour "
                      f"{color_native[0]}x{color_native[1]}", "size_mismatch")
    intrinsic = rescale_intrinsic(K, color_native, size)
    return View(files, to_points @ c2w, intrinsic, color, depth)


def view_coverage(xyz: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray, depths: np.ndarray,
                  seen: np.ndarray, tolerance: float) -> tuple[int, int]:
    """Registration evidence of a batch of views; -> (point-view pairs on a pixel with depth,
    pairs lying in observed free space).

    Marks in ``seen`` (bool [N], in place) the points that land on a pixel with depth. A pair is
    in free space when the point is closer than the observed surface by more than ``tolerance``
    times its depth: the camera sees through it, which registered data almost never shows (only at
    object edges), while points in another frame than the poses do all the time.
    """
    xyz = np.asarray(xyz, np.float32)
    pairs = free = 0
    for pose, K, depth in zip(poses, intrinsics, depths, strict=True):
        w2c = np.linalg.inv(np.asarray(pose, np.float64)).astype(np.float32)
        cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        front = z > 1e-3
        H, W = depth.shape
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.rint(cam[:, 0] * K[0, 0] / z + K[0, 2])
            v = np.rint(cam[:, 1] * K[1, 1] / z + K[1, 2])
        idx = np.flatnonzero(front & (u >= 0) & (u < W) & (v >= 0) & (v < H))
        d = depth[v[idx].astype(np.int64), u[idx].astype(np.int64)]
        has_depth = d > 0
        seen[idx[has_depth]] = True
        pairs += int(has_depth.sum())
        free += int((has_depth & (z[idx] < d * (1 - tolerance))).sum())
    return pairs, free


# ---------------------------------------------------------------------------------------------
# One room's views into a store scene


@dataclass
class RoomViews:
    """What ``store_room_views`` wrote: counts for the summary and the scene attrs."""

    frames_kept: int
    dropped: dict[str, int]
    frames_without_caption: list[int]
    attrs: dict
    warning: str | None = None  # the failed registration check, in one line


def _cached_index_key(views_dir: Path) -> tuple:
    areas = _area_dirs(views_dir)
    stamps = []
    for area in areas:
        try:
            stamps.append((area.name, (area / "data" / "rgb").stat().st_mtime_ns))
        except OSError:
            stamps.append((area.name, 0))
    return tuple(stamps)


_INDEX_CACHE: dict[tuple, ViewIndex] = {}


def room_frames(views_dir: Path, room_id: str) -> list[ViewFiles]:
    """The frames of one room (the directory index is cached per process while it is unchanged)."""
    views_dir = resolve_views_dir(views_dir)
    key = (str(views_dir), _cached_index_key(views_dir))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = index_views(views_dir)
    return _INDEX_CACHE[key].rooms.get(room_id, [])


def resolve_views_dir(views_dir: Path) -> Path:
    """The directory holding ``area_N/``: ``views_dir`` or its ``Stanford2d3dDataset_noXYZ``."""
    views_dir = Path(views_dir)
    for name in ("Stanford2d3dDataset_noXYZ", "Stanford2d3dDataset"):
        if (views_dir / name).is_dir():
            return views_dir / name
    return views_dir


def store_room_views(writer, room_id: str, room_dir: Path, xyz: np.ndarray, frames: list[ViewFiles],
                     size: tuple[int, int], *, depth_tolerance: float, margin: int | None,
                     frame_batch: int = 16, captions: dict[int, str] | None = None, encoder=None,
                     strict: bool = False, min_in_views: float = 0.5, max_free_space: float = 0.03,
                     show_progress: bool = False) -> RoomViews:
    """Decode, project and write one room's views into an open ``SceneWriter`` (points already written).

    Frames are decoded at ``size`` one at a time and projected ``frame_batch`` at a time with
    ``project_points``. Unusable frames are counted by reason in ``dropped`` (``BadView``; raised
    in ``strict`` mode). The check on load (``view_check`` in the attrs, a warning when not ok):
    the fraction of points that land on a pixel with depth in some view (``points_in_views``) must
    be at least ``min_in_views``, and the fraction of those point-view pairs lying in observed free
    space (``free_space``, see ``view_coverage``) at most ``max_free_space``; otherwise the poses
    are most likely in another frame than the points (wrong release or area).
    """
    release = s3dis_release(room_dir)
    angle = room_alignment_angle(room_dir) if release == "aligned" else None
    center = room_center(xyz) if release == "aligned" else None
    transforms = {area: points_frame(area, release, angle, center) for area in {f.area_dir for f in frames}}
    points = prepare_points(xyz)
    seen = np.zeros(len(xyz), bool)
    counts = [0, 0]  # point-view pairs on a pixel with depth, of which in observed free space
    dropped: dict[str, int] = {}
    kept: list[tuple[int, View]] = []
    parts: list[Correspondences] = []
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def project_batch() -> None:
        if batch:
            poses, Ks, depths = (np.stack(a) for a in zip(*batch, strict=True))
            parts.append(project_points(points, poses, Ks, depths, margin=margin,
                                        depth_tolerance=depth_tolerance, frame_batch=frame_batch))
            p, f = view_coverage(xyz, poses, Ks, depths, seen, depth_tolerance)
            counts[0] += p
            counts[1] += f
            batch.clear()

    writer.begin_frames(len(frames), size)
    for position, files in enumerate(tqdm(frames, desc=room_id, unit="view", leave=False,
                                          disable=not show_progress)):
        try:
            view = read_view(files, size, transforms[files.area_dir])
        except BadView as error:
            if strict:
                raise
            dropped[error.reason] = dropped.get(error.reason, 0) + 1
            log.warning("%s (frame skipped)", error)
            continue
        depth_mm = np.rint(view.depth * DEPTH_SCALE)
        depth_mm[depth_mm > 65535] = 0  # beyond the store's range: no depth rather than a wrong one
        depth_mm = depth_mm.astype(np.uint16)
        writer.add_frame(np.ascontiguousarray(view.color), depth_mm)
        kept.append((position, view))
        batch.append((view.pose, view.intrinsic.astype(np.float64),
                      depth_mm.astype(np.float32) / np.float32(DEPTH_SCALE)))
        if len(batch) == frame_batch:
            project_batch()
    project_batch()
    n = writer.end_frames()
    proj = Correspondences.concat(parts) if parts else Correspondences.empty(0)
    indices = [p for p, _ in kept]
    writer.write("frames/index", np.asarray(indices, np.int32))
    writer.write("frames/pose", np.stack([v.pose for _, v in kept]).astype(np.float32) if kept
                 else np.zeros((0, 4, 4), np.float32))
    writer.write("frames/intrinsic", np.stack([v.intrinsic for _, v in kept]).astype(np.float32) if kept
                 else np.zeros((0, 3, 3), np.float32))
    writer.write("proj/offsets", proj.offsets)
    writer.write("proj/point", proj.point)
    writer.write("proj/uv", proj.uv)
    missing: list[int] = []
    if encoder is not None:
        texts = [(captions or {}).get(i, "") for i in indices]
        missing = [i for i, t in zip(indices, texts, strict=True) if not t.strip()]
        clip = embed_captions(texts, encoder)
    else:
        texts, clip = [""] * n, np.zeros((n, 0), np.float16)
    writer.write("captions/text", np.asarray(texts, dtype=str) if texts else np.zeros(0, str))
    writer.write("captions/clip", clip)
    in_views = float(seen.mean()) if len(xyz) else 0.0
    visible = float(len(np.unique(proj.point)) / len(xyz)) if len(xyz) else 0.0
    free_space = counts[1] / counts[0] if counts[0] else 0.0
    ok = n == 0 or (in_views >= min_in_views and free_space <= max_free_space)
    warning = None
    if not ok:
        warning = (f"warning: {100 * in_views:.0f}% of the points in views, {100 * free_space:.1f}% in "
                   f"observed free space; poses in another frame ({release} release, "
                   f"{', '.join(sorted(transforms))})?")
        log.warning("%s: %s", room_id, warning)
    attrs = {
        "views_source": sorted({f.area_dir for f in frames}),
        "view_names": [v.files.name for _, v in kept],
        "s3dis_release": release,
        "alignment_angle": angle,
        "view_check": {"points_in_views": round(in_views, 4), "points_visible": round(visible, 4),
                       "free_space": round(free_space, 4), "min_in_views": min_in_views,
                       "max_free_space": max_free_space, "ok": bool(ok)},
        "intrinsics_source": f"2D-3D-S camera_k_matrix rescaled to {size[0]}x{size[1]}",
    }
    return RoomViews(n, dropped, missing, attrs, warning)


def view_captions(views_dir: Path, captions: str | Path | None) -> Path | None:
    """Caption JSON for the views: None -> ``captions.json`` in the views root if present;
    ``'none'`` -> no captions; else that file (InputError if missing)."""

    return resolve_captions(resolve_views_dir(views_dir), captions)
