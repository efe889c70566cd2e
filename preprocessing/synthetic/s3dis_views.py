"""Synthetic Stanford 2D-3D-S views of the synthetic S3DIS rooms (`xmask3d synth s3dis --views`).

For each room of `write_s3dis` (same seed and index, so the same `SceneGeometry`) this writes
the 2D-3D-S layout::

    OUT/Stanford2d3dDataset_noXYZ/area_N/data/rgb/camera_<id>_<room>_frame_<k>_domain_rgb.png
    OUT/Stanford2d3dDataset_noXYZ/area_N/data/depth/camera_<id>_<room>_frame_<k>_domain_depth.png
    OUT/Stanford2d3dDataset_noXYZ/area_N/data/pose/camera_<id>_<room>_frame_<k>_domain_pose.json
    OUT/Stanford2d3dDataset_noXYZ/captions.json         {room id: {view index: text}} (PLA format)
    OUT/Stanford3dDataset_v1.2/Area_N/Area_N_alignmentAngle.txt

Colour and 16-bit depth (1/512 m per unit, 65535 = nothing hit) are ray-cast from the room
geometry; poses hold `camera_k_matrix` and `camera_rt_matrix` (world->camera) in the area's
2D-3D-S frame: the non-aligned S3DIS frame, except in `area_5b`, whose frame is mapped to Area_5
by `AREA_TO_S3DIS['area_5b']` (Area_5 rooms alternate between area_5b and area_5a). The alignment
angles are synthetic (90, 180, 270 degrees in turn) so that the aligned release differs from the
raw one; `write_aligned_release` writes that release from the raw one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from preprocessing.s3dis.views import (
    ALIGNED_RELEASE,
    AREA_TO_S3DIS,
    DEPTH_MISSING,
    DEPTH_UNITS_PER_M,
    NATIVE_SIZE,
    RAW_RELEASE,
    alignment_transform,
    read_alignment_angles,
    room_center,
)
from preprocessing.synthetic.captions import make_caption, visible_objects
from preprocessing.synthetic.categories import CATEGORIES
from preprocessing.synthetic.files import write_text_atomic
from preprocessing.synthetic.s3dis_rooms import S3DISRoomSpec, format_points, s3dis_room

VIEWS_DIR = "Stanford2d3dDataset_noXYZ"
CAMERAS_PER_ROOM = 2
FRAMES_PER_CAMERA = 4
EYE_HEIGHT = 1.5
CAPTION_WORDS = {"sofa": "couch", "bookcase": "bookshelf", "board": "whiteboard"}


def area_dir_of(spec: S3DISRoomSpec, index: int) -> str:
    """2D-3D-S area directory of room `index`: Area_5 rooms alternate area_5b, area_5a, ..."""
    number = spec.area.split("_")[1]
    if number != "5":
        return f"area_{number}"
    return "area_5b" if (index // 2) % 2 == 0 else "area_5a"


def alignment_angle(index: int) -> int:
    """Synthetic alignment angle of room `index` (degrees)."""
    return 90 * (index % 3 + 1)


def _look(eye: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """camera_to_world with OpenCV axes (x right, y down, z forward)."""
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def _free(geo, point: np.ndarray, clearance: float = 0.35) -> bool:
    for c, h, rot in zip(geo.centers, geo.halves, geo.rotations, strict=True):
        if np.all(np.abs((point - c) @ rot) < h + clearance):
            return False
    return True


def room_cameras(spec: S3DISRoomSpec, seed: int, index: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """[(camera id, frame number, camera_to_world in the raw S3DIS frame, K at 1080x1080)]."""
    geo = spec.geometry
    rng = np.random.default_rng([seed, index, 20])
    out = []
    for _ in range(CAMERAS_PER_ROOM):
        for _try in range(100):
            local = np.array([rng.uniform(-0.45, 0.45) * geo.room_half[0],
                              rng.uniform(-0.45, 0.45) * geo.room_half[1],
                              -geo.room_half[2] + EYE_HEIGHT + rng.uniform(-0.1, 0.1)])
            eye = geo.room_center + geo.room_rot @ local
            if _free(geo, eye):
                break
        camera = "".join(rng.choice(list("0123456789abcdef"), 32))
        yaw0 = rng.uniform(0, 2 * np.pi)
        for k in range(FRAMES_PER_CAMERA):
            yaw = yaw0 + 2 * np.pi * k / FRAMES_PER_CAMERA + rng.normal(0, 0.1)
            pitch = rng.uniform(-0.35, 0.1)
            local_dir = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
            fov = rng.uniform(np.deg2rad(55), np.deg2rad(75))
            f = NATIVE_SIZE / 2 / np.tan(fov / 2)
            c = (NATIVE_SIZE - 1) / 2
            K = np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])
            out.append((camera, int(rng.integers(0, 60)) * 10 + k, _look(eye, geo.room_rot @ local_dir), K))
    return out


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_room_views(spec: S3DISRoomSpec, seed: int, index: int, views_root: Path, size: int,
                     progress: bool = False) -> dict[str, str]:
    """Render and write one room's frames; -> {view index: caption} in the reader's frame order."""
    geo = spec.geometry
    area_dir = area_dir_of(spec, index)
    data = views_root / area_dir / "data"
    for sub in ("rgb", "depth", "pose"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    to_area = np.linalg.inv(AREA_TO_S3DIS.get(area_dir, np.eye(4)))  # S3DIS frame -> area frame
    scale = size / NATIVE_SIZE
    rng = np.random.default_rng([seed, index, 21])
    # caption words: S3DIS classes named with the synthetic ScanNet vocabulary; clutter, beams and
    # columns are not named
    categories = [CAPTION_WORDS.get(o.category, o.category) for o in geo.objects]
    annotated = [c in CATEGORIES for c in categories]
    room_type = spec.name.rsplit("_", 1)[0]
    cameras = sorted(room_cameras(spec, seed, index), key=lambda c: (c[0], c[1]))
    captions = {}
    for view, (camera, frame, pose, K) in enumerate(tqdm(cameras, desc=spec.room_id, unit="frame",
                                                          leave=False, disable=not progress)):
        K_out = K.copy()
        K_out[:2] *= scale
        K_out[0, 2] = (K[0, 2] + 0.5) * scale - 0.5
        K_out[1, 2] = (K[1, 2] + 0.5) * scale - 0.5
        render = geo.render(pose, K_out, size, size)
        rgb = geo.colors(render.points, render.normal, render.object_id)
        rgb += rng.standard_normal(rgb.shape, np.float32) * 3.0
        units = np.where(np.isfinite(render.depth), np.rint(render.depth * DEPTH_UNITS_PER_M), DEPTH_MISSING)
        depth = np.clip(units, 0, DEPTH_MISSING).astype(np.uint16)
        stem = f"camera_{camera}_{spec.name}_frame_{frame}"
        _save_png_atomic(Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)),
                         data / "rgb" / f"{stem}_domain_rgb.png")
        _save_png_atomic(Image.fromarray(depth), data / "depth" / f"{stem}_domain_depth.png")
        w2c = np.linalg.inv(to_area @ pose)
        # the file's K belongs to the written image size (the real 1080x1080 K by default)
        meta = {"camera_k_matrix": K_out.tolist(), "camera_rt_matrix": w2c[:3].tolist(),
                "camera_location": (to_area @ pose)[:3, 3].tolist(), "camera_uuid": camera,
                "frame_num": frame, "room": spec.name, "field_of_view_rads":
                float(2 * np.arctan(NATIVE_SIZE / 2 / K[0, 0]))}
        write_text_atomic(data / "pose" / f"{stem}_domain_pose.json", json.dumps(meta))
        visible = visible_objects(render.object_id, categories, annotated)
        captions[str(view)] = make_caption(visible, room_type, rng)
    return captions


def write_views(out_dir: Path, rooms: int, seed: int = 0, size: int = NATIVE_SIZE,
                progress: bool = True) -> list[str]:
    """Write the 2D-3D-S views, captions and alignment angles of rooms 0..rooms-1; -> room ids."""
    out_dir = Path(out_dir)
    if size < 16:
        raise ValueError(f"view size must be at least 16 pixels, got {size}")
    views_root = out_dir / VIEWS_DIR
    captions: dict[str, dict[str, str]] = {}
    angles: dict[str, dict[str, int]] = {}
    for index in tqdm(range(rooms), desc="synthetic 2D-3D-S", unit="room", disable=not progress):
        spec = s3dis_room(seed, index)
        captions[f"{spec.area}_{spec.name}"] = write_room_views(spec, seed, index, views_root, size)
        angles.setdefault(spec.area, {})[spec.name] = alignment_angle(index)
    for area, rooms_angles in angles.items():
        lines = [f"## Global alignment angle per disjoint space in {area} ##",
                 "## Disjoint Space Name Global Alignment Angle ##"]
        lines += [f"{room} {angle}" for room, angle in sorted(rooms_angles.items())]
        area_dir = out_dir / RAW_RELEASE / area
        area_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(area_dir / f"{area}_alignmentAngle.txt", "\n".join(lines) + "\n")
    write_text_atomic(views_root / "captions.json", json.dumps(captions, indent=1))
    return sorted(captions)


def write_aligned_release(raw_root: Path, out_dir: Path) -> Path:
    """Write ``out_dir/Stanford3dDataset_v1.2_Aligned_Version`` from a raw release (test data).

    Every room is rotated by minus its alignment angle about its bounding-box centre (the map
    ``alignment_transform`` describes); annotation files keep their names and line format.
    """
    raw_root = Path(raw_root)
    if (raw_root / RAW_RELEASE).is_dir():
        raw_root = raw_root / RAW_RELEASE
    dest = Path(out_dir) / ALIGNED_RELEASE
    for area in sorted(p for p in raw_root.glob("Area_*") if p.is_dir()):
        angle_file = area / f"{area.name}_alignmentAngle.txt"
        angles = read_alignment_angles(angle_file)
        (dest / area.name).mkdir(parents=True, exist_ok=True)
        (dest / area.name / angle_file.name).write_bytes(angle_file.read_bytes())
        for room in sorted(p for p in area.iterdir() if (p / "Annotations").is_dir()):
            files = sorted((room / "Annotations").glob("*.txt"))
            parts = [np.loadtxt(f, ndmin=2) for f in files]
            T = alignment_transform(angles[room.name], room_center(np.concatenate(parts)[:, :3]))
            (dest / area.name / room.name / "Annotations").mkdir(parents=True, exist_ok=True)
            chunks = []
            for f, values in zip(files, parts, strict=True):
                xyz = values[:, :3] @ T[:3, :3].T + T[:3, 3]
                text = format_points(xyz, values[:, 3:6])
                (dest / area.name / room.name / "Annotations" / f.name).write_text(text)
                chunks.append(text)
            (dest / area.name / room.name / f"{room.name}.txt").write_text("".join(chunks))
    return dest
