"""Raw ScanNet / S3DIS -> the Zarr store: one plain function per scene.

``preprocess_scannet_scene`` streams a scene's ``.sens`` (one frame in memory at a time, frames
buffered one projection batch / one store shard at a time), reads its mesh, projects the points
into each kept depth frame, attaches the view captions' embeddings and writes ``scenes/<id>``
atomically. ``preprocessing.run`` drives these functions as plain Dask tasks; the Prefect flow
(flows/preprocess.py) drives the same.

This module is what a Dask worker imports: it imports neither torch nor Prefect. Caption
embeddings come from the driver as a ``CaptionEmbeddings`` table (``embeddings=``); only a
caller that passes none, in its own process, loads the text model (``caption_embed``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from preprocessing.captions import CaptionEmbeddings, embed_captions, load_captions, scene_captions
from preprocessing.projection import Correspondences, prepare_points, project_points
from preprocessing.region_captions import load_region_captions, scene_region_sets
from preprocessing.s3dis.reader import read_s3dis_room
from preprocessing.s3dis.views import index_views, resolve_views_dir, room_frames, store_room_views
from preprocessing.scannet.labels2d import LabelImages, label_zip_path
from preprocessing.scannet.mesh import read_label_tsv, read_scannet_scene, scene_paths
from preprocessing.scannet.sens import SensReader
from preprocessing.scannet.splits import list_scenes, scene_dir
from storage.errors import InputError
from storage.regions import RegionCaptions
from storage.schema import DEPTH_SCALE
from storage.store import OTHER_SETTINGS, create_store, open_store, recover_store

log = logging.getLogger(__name__)

S3DIS_VAL_AREA = "Area_5"
S3DIS_DIR = "Stanford3dDataset_v1.2"
S3DIS_ALIGNED_DIR = "Stanford3dDataset_v1.2_Aligned_Version"


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw scenes become store scenes. ``captions=None``: no captions (zero-size embeddings)."""

    frame_step: int = 20
    image_size: tuple[int, int] = (320, 240)  # (W, H) of stored colour/depth frames
    depth_tolerance: float = 0.25
    margin: int | None = None  # None: 10 px scaled with the width
    captions: Path | None = None
    text_encoder: str = "minilm"
    overwrite: bool = False
    frame_batch: int = 16  # frames projected together
    show_progress: bool = True
    views: Path | None = None  # S3DIS: Stanford 2D-3D-S root (area_N/data/...); None = no views
    region_captions: Path | None = None  # ScanNet: boxes + phrases per frame; None = no region captions


@dataclass
class SceneSummary:
    scene_id: str
    status: str  # "written" | "skipped" | "failed"
    points: int = 0
    frames_kept: int = 0
    frames_dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    frames_without_caption: int = 0


# ---------------------------------------------------------------------------------------------
# Inputs


def list_scannet_scenes(raw_dir: Path) -> dict[str, str]:
    """Scene id -> 'train' | 'val' | 'test' for the scenes under scans/ and scans_test/: split lists
    of the raw directory where present, else the official lists shipped with the package."""
    return list_scenes(raw_dir)


def s3dis_room_id(area: str, room: str) -> str:
    return f"{area}_{room}"


def _s3dis_base(raw_dir: Path) -> Path:
    """The release directory holding Area_N: RAW/Stanford3dDataset_v1.2[_Aligned_Version] or RAW."""
    base = Path(raw_dir)
    found = [base / d for d in (S3DIS_DIR, S3DIS_ALIGNED_DIR) if (base / d).is_dir()]
    if len(found) > 1:
        raise InputError(f"{raw_dir}: holds both {S3DIS_DIR} and {S3DIS_ALIGNED_DIR}; pass the release "
                         "directory itself as --raw")
    return found[0] if found else base


def list_s3dis_rooms(raw_dir: Path) -> dict[str, str]:
    """Room id (``Area_1_office_1``) -> 'train' | 'val' (Area 5 is val, as in the benchmarks)."""
    base = _s3dis_base(raw_dir)
    areas = sorted(p for p in base.glob("Area_*") if p.is_dir())
    if not areas:
        raise InputError(f"{raw_dir}: no Area_N directories (expected {S3DIS_DIR}/Area_N/<room>)")
    out = {}
    for area in areas:
        for room in sorted(p for p in area.iterdir() if (p / "Annotations").is_dir()):
            out[s3dis_room_id(area.name, room.name)] = "val" if area.name == S3DIS_VAL_AREA else "train"
    if not out:
        raise InputError(f"{base}: no rooms with Annotations/")
    return out


def _s3dis_room_dir(raw_dir: Path, room_id: str) -> Path:
    base = _s3dis_base(raw_dir)
    prefix, number, room = room_id.split("_", 2)  # Area_1_office_1 -> Area_1 / office_1
    return base / f"{prefix}_{number}" / room


def _file_version(path: Path, what: str) -> tuple[Path, int, int]:
    """(path, mtime, size): the cache key of a parsed file, so a changed file is parsed again."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise InputError(f"{path}: {what} file not found ({error.strerror})") from error
    return path, stat.st_mtime_ns, stat.st_size


def _captions(path: Path) -> dict[str, dict[int, str]]:
    """The caption file, parsed once per process (and again if the file changes)."""
    return _load_captions_cached(*_file_version(path, "caption"))


def _region_captions(path: Path) -> dict:
    """The region caption file, parsed once per process (and again if the file changes)."""
    return _load_regions_cached(*_file_version(path, "region caption"))


@functools.lru_cache(maxsize=2)
def _load_regions_cached(path: Path, mtime_ns: int, size: int) -> dict:
    return load_region_captions(path)


@functools.lru_cache(maxsize=4)
def _load_captions_cached(path: Path, mtime_ns: int, size: int) -> dict[str, dict[int, str]]:
    return load_captions(path)


def scene_texts(dataset: str, scene_id: str, cfg: PreprocessConfig) -> set[str]:
    """Every caption text the scene may store: view captions and region phrases of the frames
    the frame step can keep (ScanNet), or of every view (S3DIS). What the driver embeds."""
    texts: set[str] = set()
    if cfg.captions is not None and (dataset == "scannet" or cfg.views is not None):
        frames = _captions(Path(cfg.captions)).get(scene_id, {})
        step = cfg.frame_step if dataset == "scannet" else 1
        texts.update(t for i, t in frames.items() if i % step == 0)
    if cfg.region_captions is not None and dataset == "scannet":
        for i, regions in _region_captions(Path(cfg.region_captions)).get(scene_id, {}).items():
            if i % cfg.frame_step == 0:
                texts.update(text for text, _ in regions)
    return {t for t in texts if t.strip()}


def _embeddings(dataset: str, scene_id: str, cfg: PreprocessConfig,
                embeddings: CaptionEmbeddings | None) -> CaptionEmbeddings:
    """The driver's table, or (a call in one process without one) the scene's texts embedded here."""
    if embeddings is not None:
        return embeddings
    from preprocessing.caption_embed import embed_texts  # heavy: torch; never on a Dask worker

    return embed_texts(scene_texts(dataset, scene_id, cfg), cfg.text_encoder)


def _check_encoder(store, name: str | None) -> None:
    if name != store.attrs.get("text_encoder"):
        raise InputError(f"{store.path}: store captions use {store.attrs.get('text_encoder')!r}, "
                         f"this run {name!r}")


# ---------------------------------------------------------------------------------------------
# What makes a scene: its fingerprint in the store


def _stamp(path: Path) -> list[int] | None:
    """[bytes, mtime_ns] of a source file; None when it is missing."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scene_fingerprint(dataset: str, raw_dir: Path, scene_id: str, split: str, cfg: PreprocessConfig) -> dict:
    """The settings and source files that make a scene; a stored scene with another one is rewritten.

    Settings: frame step (ScanNet), image size, margin, depth tolerance, text encoder, the split,
    a digest of the scene's captions and region captions; sources: [bytes, mtime_ns] of each raw
    file the scene is read from (relative paths, so a copied raw tree with kept mtimes matches).
    """
    raw_dir = Path(raw_dir)
    if dataset == "scannet":
        raw_scene = scene_dir(raw_dir, scene_id, split)
        files = {"sens": raw_scene / f"{scene_id}.sens", **scene_paths(raw_scene),
                 "label_tsv": raw_dir / "scannetv2-labels.combined.tsv",
                 "label_images": label_zip_path(raw_scene)}
        captions = _captions(Path(cfg.captions)).get(scene_id) if cfg.captions is not None else None
        regions = (_region_captions(Path(cfg.region_captions)).get(scene_id, {})
                   if cfg.region_captions is not None else None)
        text = captions is not None or regions is not None
        settings = {"frame_step": cfg.frame_step, "image_size": list(cfg.image_size)}
    else:
        room_dir = _s3dis_room_dir(raw_dir, scene_id)
        files = {str(p.relative_to(room_dir)): p for p in sorted((room_dir / "Annotations").glob("*.txt"))}
        if cfg.views is not None:
            for view in room_frames(cfg.views, scene_id):
                for path in (view.rgb, view.depth, view.pose):
                    files[os.path.relpath(path, cfg.views)] = path
        captions = _captions(Path(cfg.captions)).get(scene_id, {}) \
            if cfg.views is not None and cfg.captions is not None else None
        regions = None
        text = captions is not None
        side = cfg.image_size[1]
        settings = {"views": cfg.views is not None,
                    "image_size": [side, side] if cfg.views is not None else list(cfg.image_size)}
    return {
        **settings, "margin": cfg.margin, "depth_tolerance": cfg.depth_tolerance, "split": split,
        "text_encoder": cfg.text_encoder if text else None,
        "captions": None if captions is None else _digest(captions),
        "region_captions": None if regions is None else _digest(regions),
        "sources": {name: _stamp(path) for name, path in files.items()},
    }


def complete_scenes(dataset: str, raw_dir: Path, store_path: Path, listing: dict[str, str],
                    cfg: PreprocessConfig) -> list[str]:
    """The scenes of ``listing`` complete in the store and made with this run's fingerprint (skip them)."""
    store = open_store(store_path)
    return [s for s, split in listing.items()
            if store.scene_is_complete(s, scene_fingerprint(dataset, raw_dir, s, split, cfg))]


def _skip_or_rewrite(store, dataset: str, raw_dir: Path, scene_id: str, split: str,
                     cfg: PreprocessConfig) -> tuple[dict, bool]:
    """-> (the scene's fingerprint, whether it is complete with it and is to be skipped)."""
    fingerprint = scene_fingerprint(dataset, raw_dir, scene_id, split, cfg)
    state = store.scene_state(scene_id, fingerprint)
    if state == OTHER_SETTINGS and not cfg.overwrite:
        log.warning("%s: stored scene %s was made with other settings (%s); rewriting it", store.path,
                    scene_id, "; ".join(store.changed_settings(scene_id, fingerprint)))
    return fingerprint, store.scene_is_complete(scene_id, fingerprint) and not cfg.overwrite


# ---------------------------------------------------------------------------------------------
# One scene


def preprocess_scannet_scene(raw_dir: Path, scene_id: str, store_path: Path, cfg: PreprocessConfig,
                             split: str | None = None, embeddings: CaptionEmbeddings | None = None
                             ) -> SceneSummary:
    """Decode, project, caption-embed and store one ScanNet scene (skips a complete one).

    ``embeddings``: the driver's table holding this scene's texts (``scene_texts``); None embeds
    them in this process.
    """

    start = time.perf_counter()
    raw_dir = Path(raw_dir)
    store = open_store(store_path, mode="r+")
    if split is None:
        split = list_scannet_scenes(raw_dir).get(scene_id)
        if split is None:
            raise InputError(f"{raw_dir}: no scene directory {scene_id} under scans/ or scans_test/")
    fingerprint, skip = _skip_or_rewrite(store, "scannet", raw_dir, scene_id, split, cfg)
    if skip:
        return SceneSummary(scene_id, "skipped")
    raw_scene = scene_dir(raw_dir, scene_id, split)
    captions = None
    if cfg.captions is not None:
        captions = _captions(Path(cfg.captions))
        if scene_id not in captions:
            raise InputError(f"{cfg.captions}: no captions for scene {scene_id} "
                             "(use --captions none to run without)")
    regions = None
    if cfg.region_captions is not None:
        regions = _region_captions(Path(cfg.region_captions)).get(scene_id, {})
    needs_text = captions is not None or regions is not None
    encoder = _embeddings("scannet", scene_id, cfg, embeddings) if needs_text else None
    _check_encoder(store, encoder.encoder if encoder else None)

    sens_path = raw_scene / f"{scene_id}.sens"
    sens = SensReader(sens_path)
    tsv = raw_dir / "scannetv2-labels.combined.tsv"
    mesh = read_scannet_scene(raw_scene, tsv, annotated=split != "test")
    zip_path = label_zip_path(raw_scene)
    label_images = LabelImages(zip_path, tsv) if zip_path.is_file() else None
    if label_images is None:
        log.info("%s: no %s; training splats point labels into its views", scene_id, zip_path.name)
    W, H = cfg.image_size
    K = sens.intrinsic(cfg.image_size).astype(np.float32)
    points = prepare_points(mesh.xyz)
    max_frames = math.ceil(sens.num_frames / cfg.frame_step)

    indices: list[int] = []
    poses: list[np.ndarray] = []
    parts: list[Correspondences] = []
    batch_pose: list[np.ndarray] = []
    batch_depth: list[np.ndarray] = []

    def project_batch() -> None:
        if batch_pose:
            parts.append(project_points(points, np.stack(batch_pose), K, np.stack(batch_depth),
                                        margin=cfg.margin, depth_tolerance=cfg.depth_tolerance,
                                        frame_batch=cfg.frame_batch))
            log.info("%s: frames %d-%d projected, %d visible pairs", scene_id, indices[-len(batch_pose)],
                     indices[-1], int(parts[-1].offsets[-1]))
            batch_pose.clear()
            batch_depth.clear()

    with store.writer(scene_id, fingerprint) as writer, label_images or contextlib.nullcontext():
        writer.write("points/xyz", mesh.xyz.astype(np.float32))
        writer.write("points/rgb", mesh.rgb.astype(np.uint8))
        writer.write("points/nyu40", mesh.nyu40.astype(np.uint8))
        writer.write("points/category", mesh.category.astype(np.uint16))
        writer.begin_frames(max_frames, cfg.image_size, label_images=label_images is not None)
        frames = sens.frames(step=cfg.frame_step, size=cfg.image_size)
        bar = tqdm(frames, total=max_frames, desc=scene_id, unit="frame", leave=False,
                   disable=not cfg.show_progress)
        for frame in bar:
            depth_mm = np.rint(np.clip(frame.depth * DEPTH_SCALE, 0, 65535)).astype(np.uint16)
            labels = label_images.frame(frame.index, cfg.image_size) if label_images else None
            writer.add_frame(np.ascontiguousarray(frame.color, dtype=np.uint8), depth_mm, labels)
            indices.append(frame.index)
            poses.append(frame.pose.astype(np.float32))
            batch_pose.append(poses[-1])
            batch_depth.append(depth_mm.astype(np.float32) / np.float32(DEPTH_SCALE))
            if len(batch_pose) == cfg.frame_batch:
                project_batch()
        project_batch()
        bar.close()
        n_frames = writer.end_frames()
        proj = Correspondences.concat(parts) if parts else Correspondences.empty(0)
        writer.write("frames/index", np.asarray(indices, np.int32))
        writer.write("frames/pose", np.stack(poses) if poses else np.zeros((0, 4, 4), np.float32))
        writer.write("frames/intrinsic", np.repeat(K[None], n_frames, axis=0))
        writer.write("proj/offsets", proj.offsets)
        writer.write("proj/point", proj.point)
        writer.write("proj/uv", proj.uv)
        missing: list[int] = []
        if captions is not None:
            texts, missing = scene_captions(captions, scene_id, indices, source=cfg.captions)
            clip = embed_captions(texts, encoder)
        else:
            texts, clip = [""] * n_frames, np.zeros((n_frames, encoder.dim if encoder else 0), np.float16)
        writer.write("captions/text", np.asarray(texts, dtype=str) if texts else np.zeros(0, str))
        writer.write("captions/clip", clip)
        if regions is not None:
            texts_r, sets, rows, boxes = scene_region_sets(
                regions, indices, (sens.color_width, sens.color_height), cfg.image_size, proj.offsets,
                proj.point, proj.uv)
            writer.write_regions(RegionCaptions.from_sets(texts_r, sets, embed_captions(texts_r, encoder),
                                                          rows, boxes),
                                 {"format": "boxes", "file": Path(cfg.region_captions).name})
        dropped = dict(sens.dropped)
        source_files = {**{str(k): int(v) for k, v in mesh.source_files.items()},
                        sens_path.name: int(sens_path.stat().st_size)}
        if label_images is not None:
            source_files[zip_path.name] = int(zip_path.stat().st_size)
        writer.commit({
            "split": split,
            "dataset": "scannet",
            "source_files": source_files,
            "frame_step": cfg.frame_step,
            "dropped_frames": dropped,
            "axis_alignment": np.asarray(mesh.axis_alignment, np.float64).tolist(),
            "intrinsics_source": f"{sens_path.name} header intrinsic_depth "
                                 f"({sens.depth_width}x{sens.depth_height}) rescaled to {W}x{H}",
            "frames_without_caption": missing,
            "captions": str(cfg.captions) if cfg.captions else None,
            "image_size": [W, H],
            "num_points": int(len(mesh.xyz)),
            "num_frames": int(n_frames),
            "depth_scale": DEPTH_SCALE,
            "depth_tolerance": cfg.depth_tolerance,
            "margin": cfg.margin,
            # 2D label images: None = the scene has none and training splats point labels instead
            "label_images": {"file": zip_path.name, "resize": "nearest"} if label_images else None,
        })
    return SceneSummary(scene_id, "written", points=len(mesh.xyz), frames_kept=n_frames,
                        frames_dropped=dropped, seconds=time.perf_counter() - start,
                        frames_without_caption=len(missing))


def preprocess_s3dis_room(raw_dir: Path, room_id: str, store_path: Path, cfg: PreprocessConfig,
                          split: str | None = None, embeddings: CaptionEmbeddings | None = None
                          ) -> SceneSummary:
    """Store one S3DIS room: points and labels, and with ``cfg.views`` its 2D-3D-S views.

    Views are stored square (side = the configured image height), projected and caption-embedded
    by ``preprocessing.s3dis.views.store_room_views``; without ``cfg.views`` the room has 0 frames.
    """

    start = time.perf_counter()
    store = open_store(store_path, mode="r+")
    room_dir = _s3dis_room_dir(raw_dir, room_id)
    if not room_dir.is_dir():
        raise InputError(f"{room_dir}: room not found")
    split = split or ("val" if room_id.startswith(S3DIS_VAL_AREA + "_") else "train")
    fingerprint, skip = _skip_or_rewrite(store, "s3dis", raw_dir, room_id, split, cfg)
    if skip:
        return SceneSummary(room_id, "skipped")
    frames = room_frames(cfg.views, room_id) if cfg.views is not None else []
    encoder = captions = None
    if cfg.views is not None:
        if cfg.captions is not None:
            captions = _captions(Path(cfg.captions)).get(room_id, {})
            encoder = _embeddings("s3dis", room_id, cfg, embeddings)
        _check_encoder(store, encoder.encoder if encoder else None)
    room = read_s3dis_room(room_dir)
    W, H = (cfg.image_size[1], cfg.image_size[1]) if cfg.views is not None else cfg.image_size
    views = None
    with store.writer(room_id, fingerprint) as writer:
        writer.write("points/xyz", room.xyz.astype(np.float32))
        writer.write("points/rgb", room.rgb.astype(np.uint8))
        writer.write("points/label", room.label.astype(np.uint8))
        if cfg.views is not None:
            views = store_room_views(writer, room_id, room_dir, room.xyz, frames, (W, H),
                                     depth_tolerance=cfg.depth_tolerance, margin=cfg.margin,
                                     frame_batch=cfg.frame_batch, captions=captions, encoder=encoder,
                                     show_progress=cfg.show_progress)
        else:
            writer.begin_frames(0, cfg.image_size)
            writer.end_frames()
            writer.write("frames/index", np.zeros(0, np.int32))
            writer.write("frames/pose", np.zeros((0, 4, 4), np.float32))
            writer.write("frames/intrinsic", np.zeros((0, 3, 3), np.float32))
            empty = Correspondences.empty(0)
            writer.write("proj/offsets", empty.offsets)
            writer.write("proj/point", empty.point)
            writer.write("proj/uv", empty.uv)
            writer.write("captions/text", np.zeros(0, str))
            writer.write("captions/clip", np.zeros((0, int(store.attrs.get("text_dim") or 0)), np.float16))
        writer.commit({
            "split": split,
            "dataset": "s3dis",
            "source_files": {str(k): int(v) for k, v in room.source_files.items()},
            "skipped_lines": int(room.skipped_lines),
            "frame_step": 1 if views else cfg.frame_step,
            "dropped_frames": views.dropped if views else {},
            "axis_alignment": np.eye(4).tolist(),
            "intrinsics_source": None,
            "frames_without_caption": views.frames_without_caption if views else [],
            "captions": str(cfg.captions) if views and cfg.captions else None,
            "image_size": [W, H],
            "num_points": int(len(room.xyz)),
            "num_frames": views.frames_kept if views else 0,
            "depth_scale": DEPTH_SCALE,
            "depth_tolerance": cfg.depth_tolerance,
            "margin": cfg.margin,
            **(views.attrs if views else {}),
        })
    return SceneSummary(room_id, "written", points=len(room.xyz), seconds=time.perf_counter() - start,
                        frames_kept=views.frames_kept if views else 0,
                        frames_dropped=views.dropped if views else {},
                        error=views.warning if views else None,
                        frames_without_caption=len(views.frames_without_caption) if views else 0)


SCENE_FUNCTIONS = {"scannet": preprocess_scannet_scene, "s3dis": preprocess_s3dis_room}


def preprocess_scene_safe(dataset: str, raw_dir: Path, scene_id: str, store_path: Path,
                          cfg: PreprocessConfig, split: str | None = None,
                          embeddings: CaptionEmbeddings | None = None) -> SceneSummary:
    """Like the per-scene functions, but a failure becomes a 'failed' summary (for Dask tasks)."""
    start = time.perf_counter()
    try:
        return SCENE_FUNCTIONS[dataset](raw_dir, scene_id, store_path, cfg, split, embeddings)
    except Exception as error:  # one bad scene must not stop the others
        log.error("%s failed: %s\n%s", scene_id, error, traceback.format_exc())
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return SceneSummary(scene_id, "failed", error=f"{type(error).__name__}: {message}",
                            seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_store(dataset: str, raw_dir: Path, store_path: Path, cfg: PreprocessConfig,
                  scenes: Iterable[str] | None = None) -> tuple[dict[str, str], PreprocessConfig]:
    """Validate inputs, create/open the store and remove stale temporaries; -> (scene -> split, cfg).

    Every bad input (unknown scenes, missing captions for a scene, incompatible store) fails here,
    before any worker starts.
    """
    if dataset not in SCENE_FUNCTIONS:
        raise InputError(f"unknown dataset {dataset!r} (scannet, s3dis)")
    if cfg.frame_step < 1:
        raise InputError(f"--frame-step must be >= 1, got {cfg.frame_step}")
    listing = list_scannet_scenes(raw_dir) if dataset == "scannet" else list_s3dis_rooms(raw_dir)
    if dataset == "scannet":  # a bad label TSV is one error here, not one per scene
        read_label_tsv(raw_dir / "scannetv2-labels.combined.tsv")
    if scenes is not None:
        scenes = list(scenes)
        unknown = [s for s in scenes if s not in listing]
        if unknown:
            raise InputError(f"{raw_dir}: unknown scenes {', '.join(unknown)}")
        listing = {s: listing[s] for s in scenes}
    encoder_name, text_dim = None, 0
    if dataset == "s3dis" and cfg.views is None:
        cfg = PreprocessConfig(**{**cfg.__dict__, "captions": None})
    if dataset == "s3dis" and cfg.views is not None:

        views = resolve_views_dir(Path(cfg.views)).resolve()
        index_views(views, rooms=list_s3dis_rooms(raw_dir))  # checks the layout; logs counted skips
        cfg = PreprocessConfig(**{**cfg.__dict__, "views": views})
    if cfg.region_captions is not None:
        if dataset != "scannet":
            raise InputError("region captions from boxes are read for ScanNet only "
                             "(use xmask3d import-captions for point-set captions)")
        cfg = PreprocessConfig(**{**cfg.__dict__, "region_captions": Path(cfg.region_captions).resolve()})
        regions = _region_captions(cfg.region_captions)
        missing = [s for s in listing if s not in regions]
        if missing:
            log.warning("%s: no region captions for scene(s) %s", cfg.region_captions, ", ".join(missing))

        from preprocessing.text import text_encoder_info  # heavy: torch, only with captions

        encoder_name, text_dim = text_encoder_info(cfg.text_encoder)
    if cfg.captions is not None:
        cfg = PreprocessConfig(**{**cfg.__dict__, "captions": Path(cfg.captions).resolve()})
        captions = _captions(cfg.captions)
        missing = [s for s in listing if s not in captions]
        if missing and dataset == "s3dis":  # rooms without views have no captions either
            log.warning("%s: no captions for room(s) %s", cfg.captions, ", ".join(missing))
        elif missing:
            raise InputError(f"{cfg.captions}: no captions for scene(s) {', '.join(missing)} "
                             "(use --captions none to run without)")

        from preprocessing.text import text_encoder_info  # heavy: torch, only with captions

        encoder_name, text_dim = text_encoder_info(cfg.text_encoder)
    store = create_store(store_path, dataset, encoder_name, text_dim)
    for action in recover_store(store):  # only what writers that are gone left behind
        log.warning("%s: %s", store_path, action)
    return listing, cfg


def format_summaries(summaries: list[SceneSummary]) -> str:
    """A plain-text table of per-scene results (for the command line)."""
    lines = [f"{'scene':<24} {'status':<8} {'points':>9} {'frames':>7} {'no-caption':>10}  error"]
    for s in summaries:
        lines.append(f"{s.scene_id:<24} {s.status:<8} {s.points:>9} {s.frames_kept:>7} "
                     f"{s.frames_without_caption:>10}  {s.error or ''}")
    counts = {k: sum(s.status == k for s in summaries) for k in ("written", "skipped", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
