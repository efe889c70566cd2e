"""Synthetic scenes in the raw ScanNet v2 layout (the files the official download script fetches).

`write_scannet` writes, under OUT:
  scans/<sceneXXXX_00>/<id>.sens, <id>_vh_clean_2.ply, <id>_vh_clean_2.labels.ply,
  <id>_vh_clean_2.0.010000.segs.json, <id>.aggregation.json, <id>.txt,
  <id>_2d-label-filt.zip (label-filt/<frame>.png: 16-bit raw category id per colour pixel)
  scannetv2-labels.combined.tsv, scannetv2_train.txt, scannetv2_val.txt, captions.json,
  region_captions.json (a detector-captioner's boxes + phrases per frame, docs/openvocab.md)
Depth and colour frames are ray-cast from the same geometry the mesh is sampled from, so the
depth test of a point-to-pixel projection sees real occlusions. `scannet_scene(seed, index)`
rebuilds a scene's geometry, cameras and intrinsics without writing anything (for tests).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from preprocessing.region_captions import REGION_FORMAT
from preprocessing.synthetic.captions import make_caption, region_captions, visible_objects
from preprocessing.synthetic.categories import CATEGORIES, tsv_rows
from preprocessing.synthetic.files import check_out_dir, fresh_temp_dir, move_into_place, write_text_atomic
from preprocessing.synthetic.geometry import SceneGeometry, rot_z
from preprocessing.synthetic.layout import ROOM_CYCLE, build_geometry, layout_room
from preprocessing.synthetic.ply import write_ply
from preprocessing.synthetic.sens import (
    SensFrameBytes,
    SensHeader,
    encode_color,
    encode_depth,
    synthetic_imu,
    write_sens,
)


@dataclass(frozen=True)
class ScanNetSize:
    """Image sizes (W, H) and mesh vertex spacing of one output size."""

    color: tuple[int, int]
    depth: tuple[int, int]
    mesh_spacing: float


SMALL = ScanNetSize(color=(320, 240), depth=(160, 120), mesh_spacing=0.085)
FULL = ScanNetSize(color=(1296, 968), depth=(640, 480), mesh_spacing=0.035)

# per-scene calibration at full size, as found across real ScanNet scenes
DEPTH_CALIB = ((577.590698, 318.905426, 242.683609), (570.920471, 319.500000, 239.500000),
               (578.000000, 321.398590, 237.126221), (574.329956, 320.174438, 240.856628),
               (571.623718, 319.500000, 239.500000), (577.870605, 319.500000, 239.500000))
COLOR_CALIB = ((1170.187988, 647.750000, 483.750000), (1165.723022, 649.094971, 484.765015),
               (1169.621094, 646.295044, 489.927032), (1161.753906, 651.109985, 480.214996),
               (1158.310059, 643.250000, 486.330017), (1170.187988, 647.750000, 483.750000))
FRAME_PERIOD_US = 33_333
INVALID_POSE_FRAMES = (13, 40)  # frames with a lost track (pose all -inf), as in real scans


def scene_name(index: int) -> str:
    return f"scene{index:04d}_00"


def _intrinsic(fx: float, cx: float, cy: float, scale: float, fy_ratio: float = 1.0) -> np.ndarray:
    k = np.eye(4)
    k[0, 0], k[1, 1] = fx * scale, fx * fy_ratio * scale
    k[0, 2], k[1, 2] = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5
    return k


@dataclass
class ScanNetScene:
    """Everything that defines one synthetic scene (no rendering done yet)."""

    scene_id: str
    scene_type: str
    geometry: SceneGeometry
    axis_alignment: np.ndarray  # 4x4: raw -> axis-aligned, as in <id>.txt
    intrinsic_color: np.ndarray  # 4x4 at the written color size
    intrinsic_depth: np.ndarray  # 4x4 at the written depth size
    poses: np.ndarray  # [F,4,4] camera_to_world (OpenCV axes); rows of -inf for lost frames
    size: ScanNetSize
    seed: int
    index: int


def scannet_scene(seed: int, index: int, small: bool = True) -> ScanNetScene:
    """Rebuild scene `index` of `write_scannet(..., seed=seed)` deterministically."""
    size = SMALL if small else FULL
    room_type = ROOM_CYCLE[index % len(ROOM_CYCLE)]
    scene_type, dims, placed = layout_room(room_type, np.random.default_rng([seed, index, 0]))
    rng = np.random.default_rng([seed, index, 1])
    yaw = float(rng.uniform(0, 2 * np.pi))
    offset = np.array([rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), 0.0])
    geometry = build_geometry(dims, placed, yaw, offset)
    to_raw = np.eye(4)
    to_raw[:3, :3], to_raw[:3, 3] = rot_z(yaw), offset
    to_aligned = np.eye(4)
    to_aligned[:3, 3] = [-dims[0] / 2, -dims[1] / 2, 0.0]
    axis_alignment = to_aligned @ np.linalg.inv(to_raw)

    d_fx, d_cx, d_cy = DEPTH_CALIB[index % len(DEPTH_CALIB)]
    c_fx, c_cx, c_cy = COLOR_CALIB[(index + 2) % len(COLOR_CALIB)]
    fy_ratio = 1.0 + 0.002 * ((index % 3) - 1)
    intrinsic_depth = _intrinsic(d_fx, d_cx, d_cy, size.depth[0] / 640, fy_ratio)
    intrinsic_color = _intrinsic(c_fx, c_cx, c_cy, size.color[0] / 1296)

    num_frames = 110 + 10 * (index % 3)
    poses = to_raw @ _trajectory(dims, num_frames, rng)
    for f in INVALID_POSE_FRAMES:
        if f < num_frames:
            poses[f] = -np.inf
    return ScanNetScene(scene_name(index), scene_type, geometry, axis_alignment, intrinsic_color,
                        intrinsic_depth, poses, size, seed, index)


def _look_at(eye: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def _trajectory(dims, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A hand-held-like loop in the free middle of the room, looking across the room (room frame)."""
    width, depth, _ = dims
    theta0 = rng.uniform(0, 2 * np.pi)
    turns = rng.uniform(0.9, 1.2) * rng.choice([-1.0, 1.0])
    eye_z = rng.uniform(1.4, 1.6)
    target_z = rng.uniform(0.6, 0.9)
    phase = rng.uniform(0, 2 * np.pi)
    poses = np.empty((num_frames, 4, 4))
    for i in range(num_frames):
        th = theta0 + 2 * np.pi * turns * i / num_frames
        eye = np.array([width / 2 + 0.22 * width * np.cos(th), depth / 2 + 0.22 * depth * np.sin(th),
                        eye_z + 0.08 * np.sin(2.3 * th)])
        phi = th + np.pi + 0.6 * np.sin(1.7 * th + phase)
        target = np.array([width / 2 + 0.4 * width * np.cos(phi), depth / 2 + 0.4 * depth * np.sin(phi),
                           target_z + 0.2 * np.sin(1.3 * th)])
        poses[i] = _look_at(eye, target, 0.05 * np.sin(3.1 * th + phase))
    return poses


@dataclass
class RenderedFrame:
    """One rendered RGB-D frame before encoding."""

    index: int
    color: np.ndarray  # uint8 [H,W,3]
    depth_mm: np.ndarray  # uint16 [H,W]
    color_objects: np.ndarray  # int [H,W] object id per color pixel (-1 = none)


def render_frame(scene: ScanNetScene, index: int, rng: np.random.Generator) -> RenderedFrame:
    """Ray-cast colour and depth of one frame (both black/zero for a lost pose)."""
    (cw, ch), (dw, dh) = scene.size.color, scene.size.depth
    pose = scene.poses[index]
    if not np.all(np.isfinite(pose)):
        return RenderedFrame(index, np.zeros((ch, cw, 3), np.uint8), np.zeros((dh, dw), np.uint16),
                             np.full((ch, cw), -1))
    geo = scene.geometry
    dep = geo.render(pose, scene.intrinsic_depth, dw, dh, shading=False)
    finite = np.isfinite(dep.depth)
    z = np.where(finite, dep.depth, 0.0) * (1.0 + rng.standard_normal(dep.depth.shape, np.float32) * 0.001)
    depth_mm = np.clip(np.rint(z * 1000.0), 0, 65535).astype(np.uint16)
    col = geo.render(pose, scene.intrinsic_color, cw, ch)
    rgb = geo.colors(col.points, col.normal, col.object_id)
    rgb += rng.standard_normal(rgb.shape, np.float32) * 3.0
    return RenderedFrame(index, np.clip(np.rint(rgb), 0, 255).astype(np.uint8), depth_mm, col.object_id)


def _nyu40_palette(label: np.ndarray) -> np.ndarray:
    """Deterministic per-label colours for the labels PLY (0 = unannotated = black)."""
    rng = np.random.default_rng(40)
    table = np.vstack([[0, 0, 0], rng.integers(40, 256, (40, 3))]).astype(np.uint8)
    return table[label]


def _write_mesh_files(scene: ScanNetScene, scene_dir: Path) -> None:
    sid, geo = scene.scene_id, scene.geometry
    surf = geo.surface_grid(scene.size.mesh_spacing)
    rng = np.random.default_rng([scene.seed, scene.index, 2])
    rgb = geo.colors(surf.xyz, surf.normal, surf.object_id) + rng.normal(0, 4.0, surf.xyz.shape)
    rgba = np.concatenate([np.clip(np.rint(rgb), 0, 255), np.full((len(rgb), 1), 255)], 1).astype(np.uint8)
    xyz = surf.xyz.astype(np.float32)
    write_ply(scene_dir / f"{sid}_vh_clean_2.ply", xyz, rgba, surf.faces)
    annotated = np.array([o.annotated for o in geo.objects])
    nyu = np.array([CATEGORIES[o.category].nyu40 for o in geo.objects])
    label = np.where(annotated[surf.object_id], nyu[surf.object_id], 0).astype(np.uint16)
    label_rgba = np.concatenate([_nyu40_palette(label), np.full((len(label), 1), 255, np.uint8)], 1)
    write_ply(scene_dir / f"{sid}_vh_clean_2.labels.ply", xyz, label_rgba, surf.faces, label=label)
    segs = {"params": {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "5000",
                       "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"},
            "sceneId": sid, "segIndices": surf.segment.tolist()}
    (scene_dir / f"{sid}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(segs))
    groups = []
    for obj in geo.objects:
        if not obj.annotated:
            continue
        segments = np.unique(surf.segment[surf.object_id == obj.object_id])
        if len(segments):
            k = len(groups)
            groups.append({"id": k, "objectId": k, "segments": segments.tolist(), "label": obj.category})
    aggregation = {"sceneId": f"scannet.{sid}", "appId": "Aggregator.v2", "segGroups": groups,
                   "segmentsFile": f"scannet.{sid}_vh_clean_2.0.010000.segs.json"}
    (scene_dir / f"{sid}.aggregation.json").write_text(json.dumps(aggregation))


def label_image(scene: ScanNetScene, color_objects: np.ndarray) -> np.ndarray:
    """uint16 [H,W] raw category id (TSV ``id``) per colour pixel, 0 = unannotated or nothing hit:
    what ScanNet's ``label-filt`` images hold, here rendered from the scene's own geometry."""
    objects = scene.geometry.objects
    table = np.array([CATEGORIES[o.category].raw_id if o.annotated else 0 for o in objects] + [0], np.uint16)
    return table[np.where(color_objects >= 0, color_objects, len(objects))]


def encode_label_png(label: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of a uint16 label image (the format of ScanNet's label zips)."""
    buffer = io.BytesIO()
    Image.fromarray(label.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_meta(scene: ScanNetScene, scene_dir: Path, num_imu: int) -> None:
    (cw, ch), (dw, dh) = scene.size.color, scene.size.depth
    kc, kd = scene.intrinsic_color, scene.intrinsic_depth
    n = len(scene.poses)
    lines = [
        "axisAlignment = " + " ".join(f"{v:.6f}" for v in scene.axis_alignment.ravel()),
        f"colorHeight = {ch}",
        "colorToDepthExtrinsics = " + " ".join(f"{v:.6f}" for v in np.eye(4).ravel()),
        f"colorWidth = {cw}",
        f"depthHeight = {dh}",
        f"depthWidth = {dw}",
        f"fx_color = {kc[0, 0]:.6f}", f"fx_depth = {kd[0, 0]:.6f}",
        f"fy_color = {kc[1, 1]:.6f}", f"fy_depth = {kd[1, 1]:.6f}",
        f"mx_color = {kc[0, 2]:.6f}", f"mx_depth = {kd[0, 2]:.6f}",
        f"my_color = {kc[1, 2]:.6f}", f"my_depth = {kd[1, 2]:.6f}",
        f"numColorFrames = {n}", f"numDepthFrames = {n}", f"numIMUmeasurements = {num_imu}",
        f"sceneType = {scene.scene_type}",
    ]
    (scene_dir / f"{scene.scene_id}.txt").write_text("\n".join(lines) + "\n")


def write_scene(scene: ScanNetScene, scene_dir: Path, progress: bool = True
                ) -> tuple[dict[str, str], dict[str, list[dict[str, object]]]]:
    """Write all raw files of one scene into `scene_dir` (must exist); returns the view captions
    and the region captions (frame -> [{"text", "box"}])."""
    sid, geo = scene.scene_id, scene.geometry
    rng = np.random.default_rng([scene.seed, scene.index, 3])
    region_rng = np.random.default_rng([scene.seed, scene.index, 4])  # keeps the other draws as before
    regions: dict[str, list[dict[str, object]]] = {}
    categories = [o.category for o in geo.objects]
    annotated = [o.annotated for o in geo.objects]
    captions: dict[str, str] = {}
    start_us = 1_000_000 * (1 + scene.index)
    labels = zipfile.ZipFile(scene_dir / f"{sid}_2d-label-filt.zip", "w", zipfile.ZIP_STORED)

    def frames() -> Iterator[SensFrameBytes]:
        for i in tqdm(range(len(scene.poses)), desc=sid, unit="frame", leave=False, disable=not progress):
            frame = render_frame(scene, i, rng)
            labels.writestr(f"label-filt/{i}.png", encode_label_png(label_image(scene, frame.color_objects)))
            if np.all(np.isfinite(scene.poses[i])):
                visible = visible_objects(frame.color_objects, categories, annotated)
                captions[str(i)] = make_caption(visible, scene.scene_type, rng)
                regions[str(i)] = region_captions(frame.color_objects, categories, annotated, region_rng)
            ts = start_us + i * FRAME_PERIOD_US
            yield SensFrameBytes(scene.poses[i].astype(np.float32), ts, ts + 120, encode_color(frame.color),
                                 encode_depth(frame.depth_mm))

    (cw, ch), (dw, dh) = scene.size.color, scene.size.depth
    header = SensHeader(intrinsic_color=scene.intrinsic_color, intrinsic_depth=scene.intrinsic_depth,
                        color_width=cw, color_height=ch, depth_width=dw, depth_height=dh)
    num_imu = 2 * len(scene.poses)
    imu = synthetic_imu(num_imu, start_us, FRAME_PERIOD_US // 2, rng)
    with labels:
        write_sens(scene_dir / f"{sid}.sens", header, frames(), imu)
    _write_mesh_files(scene, scene_dir)
    _write_meta(scene, scene_dir, num_imu)
    return captions, regions


def write_scannet(out_dir: Path, scenes: int = 3, small: bool = False, seed: int = 0,
                  progress: bool = True) -> list[str]:
    """Write `scenes` synthetic scenes in the raw ScanNet v2 layout under `out_dir`; returns scene ids.

    Each scene is written into a temporary directory and renamed when complete, so an interrupted
    run never leaves a complete-looking scene. The last max(1, scenes // 4) scenes form the val split.
    """
    out_dir = check_out_dir(out_dir, "scans", scenes, "scenes", seed)
    scans = out_dir / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    captions: dict[str, dict[str, str]] = {}
    regions: dict[str, dict[str, list[dict[str, object]]]] = {}
    for index in tqdm(range(scenes), desc="synthetic ScanNet", unit="scene", disable=not progress):
        scene = scannet_scene(seed, index, small)
        tmp = fresh_temp_dir(scans, scene.scene_id)
        tmp.mkdir()
        captions[scene.scene_id], regions[scene.scene_id] = write_scene(scene, tmp, progress)
        move_into_place(tmp, scans / scene.scene_id)
        ids.append(scene.scene_id)
    n_val = max(1, scenes // 4)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    tsv = "\n".join("\t".join(r) for r in tsv_rows()) + "\n"
    write_text_atomic(out_dir / "scannetv2-labels.combined.tsv", tsv)
    write_text_atomic(out_dir / "scannetv2_train.txt", "".join(f"{s}\n" for s in train))
    write_text_atomic(out_dir / "scannetv2_val.txt", "".join(f"{s}\n" for s in val))
    write_text_atomic(out_dir / "captions.json", json.dumps(captions, indent=1))
    write_text_atomic(out_dir / "region_captions.json", json.dumps(
        {"format": REGION_FORMAT, "box": "x_min y_min x_max y_max in colour-image pixels",
         "scenes": regions}))
    return ids
