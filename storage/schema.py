"""Zarr store schema v2: every array of a scene with its dtype, shape, chunking and codec.

Layout (see ARCHITECTURE.md and docs/store.md)::

    <store>.zarr/                 attrs: schema_version, dataset, created_by, text_encoder, text_dim
      scenes/<scene_id>/          attrs: SCENE_ATTRS
        points/{xyz,rgb,nyu40,category,label}
        frames/{index,pose,intrinsic,color,depth}
        frames/{nyu40,category}     ScanNet 2D label images (present when attr label_images is set)
        proj/{offsets,point,uv}
        captions/{text,clip}
        captions/region_{frame,box,text,clip,offsets,point}   optional (attr region_captions)

Numeric arrays are compressed with Blosc zstd (bit-shuffled). Frames are chunked one frame per
chunk and sharded so a scene's frames live in one file (one shard per ``FRAME_SHARD`` frames,
i.e. one per scene for scenes up to that many kept frames; longer scenes get several shards so a
writer never holds more than one shard of frames in memory). ``proj/point`` and ``proj/uv`` are
chunked ``PROJ_CHUNK`` rows (one view's correspondences touch one or two chunks, so a training
sample decompresses little) inside shards of ``PROJ_SHARD`` rows (few files per scene).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA_VERSION = 2
# What each version changed: the message for a store of an older version (it must be preprocessed again).
SCHEMA_CHANGES = {
    2: "v2 adds the 2D label images frames/nyu40 and frames/category (from <scene>_2d-label-filt.zip) "
       "and reads one view's correspondences per sample (proj/* in 65536-row chunks)",
}
DEPTH_SCALE = 1000.0  # frames/depth is uint16 millimetres (ScanNet's depth shift)
FRAME_SHARD = 256  # frames per shard of frames/color, frames/depth and the label images
POINT_CHUNK = 1 << 18  # rows per chunk of points/* arrays
PROJ_CHUNK = 1 << 16  # rows per chunk of proj/point and proj/uv (a view has < 65000 visible points)
PROJ_SHARD = 1 << 20  # rows per shard of proj/point and proj/uv

ROOT_ATTRS = ("schema_version", "dataset", "created_by", "text_encoder", "text_dim")
SCENE_ATTRS = ("split", "source_files", "frame_step", "dropped_frames", "axis_alignment",
               "intrinsics_source", "frames_without_caption", "image_size", "num_points",
               "num_frames", "depth_scale", "fingerprint", "write_token", "complete", "region_captions",
               "label_images")


def blosc() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


@dataclass(frozen=True)
class ArraySpec:
    """One array of a scene: dtype, trailing shape and how the leading axis is chunked."""

    name: str
    dtype: str
    tail: tuple[str | int, ...]  # trailing dims; "H", "W", "D" are filled in per scene
    chunk: str  # "points" | "frame" (one frame per chunk, sharded) | "all" | "proj"
    description: str


ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("points/xyz", "float32", (3,), "points", "point coordinates, raw scan frame (metres)"),
    ArraySpec("points/rgb", "uint8", (3,), "points", "point colour"),
    ArraySpec("points/nyu40", "uint8", (), "points", "ScanNet: NYU40 class id per point (0 = none)"),
    ArraySpec("points/category", "uint16", (), "points",
              "ScanNet: raw category id per point (ScanNet200 source, 0 = unannotated)"),
    ArraySpec("points/label", "uint8", (), "points", "S3DIS: class index 0..12"),
    ArraySpec("frames/index", "int32", (), "all", "original frame number in the .sens"),
    ArraySpec("frames/pose", "float32", (4, 4), "all", "camera_to_world"),
    ArraySpec("frames/intrinsic", "float32", (3, 3), "all", "depth-image intrinsics at the stored size"),
    ArraySpec("frames/color", "uint8", ("H", "W", 3), "frame", "colour image resized to the depth size"),
    ArraySpec("frames/depth", "uint16", ("H", "W"), "frame", "depth in millimetres, 0 = invalid"),
    # ScanNet 2D label images (the release's label-filt PNGs at the stored size, nearest neighbour);
    # present when the scene attr ``label_images`` is set, else training splats point labels.
    ArraySpec("frames/nyu40", "uint8", ("H", "W"), "frame", "ScanNet: NYU40 id per pixel (0 = none)"),
    ArraySpec("frames/category", "uint16", ("H", "W"), "frame",
              "ScanNet: raw category id per pixel (label-filt value, 0 = unannotated)"),
    ArraySpec("proj/offsets", "int64", (), "all", "CSR over frames, length F+1"),
    ArraySpec("proj/point", "int32", (), "proj", "visible point index, sorted within a frame"),
    ArraySpec("proj/uv", "uint16", (2,), "proj", "pixel (column u, row v) in the stored frame"),
    ArraySpec("captions/text", "str", (), "all", "caption of each frame ('' = none)"),
    ArraySpec("captions/clip", "float16", ("D",), "all", "text embedding of each caption (0 = none)"),
    # Optional region captions (RegionPLC-style: a phrase per object box or per point set). A scene
    # has them when its attrs hold ``region_captions`` (written after these arrays); scenes without
    # them stay valid v1 scenes.
    ArraySpec("captions/region_frame", "int32", (), "all",
              "row of frames/* the region was seen in (-1 = not tied to one frame)"),
    ArraySpec("captions/region_box", "float32", (4,), "all",
              "region box (x_min, y_min, x_max, y_max) in stored-frame pixels (NaN = given as a point set)"),
    ArraySpec("captions/region_text", "str", (), "all", "phrase naming the region"),
    ArraySpec("captions/region_clip", "float16", ("D",), "all", "text embedding of each region phrase"),
    ArraySpec("captions/region_offsets", "int64", (), "all", "CSR over regions, length R+1"),
    ArraySpec("captions/region_point", "int32", (), "proj", "point indices of each region, sorted"),
)}

SCANNET_POINT_ARRAYS = ("points/xyz", "points/rgb", "points/nyu40", "points/category")
S3DIS_POINT_ARRAYS = ("points/xyz", "points/rgb", "points/label")
LABEL_IMAGE_ARRAYS = ("frames/nyu40", "frames/category")
FRAME_ARRAYS = ("frames/index", "frames/pose", "frames/intrinsic", "frames/color", "frames/depth",
                "proj/offsets", "proj/point", "proj/uv", "captions/text", "captions/clip")


def array_shape(name: str, length: int, H: int = 0, W: int = 0, D: int = 0) -> tuple[int, ...]:
    dims = {"H": H, "W": W, "D": D}
    return (length, *(dims[t] if isinstance(t, str) else t for t in ARRAYS[name].tail))


def create_array(group: zarr.Group, name: str, length: int, *, H: int = 0, W: int = 0, D: int = 0,
                 shard_frames: int | None = None, overwrite: bool = False) -> zarr.Array:
    """Create ``name`` in a scene group with the schema's dtype, chunks, shards and codec."""
    spec = ARRAYS[name]
    shape = array_shape(name, length, H, W, D)
    tail = shape[1:]
    lead = {"points": POINT_CHUNK, "proj": PROJ_CHUNK, "all": max(length, 1), "frame": 1}[spec.chunk]
    chunks = (max(1, min(lead, max(length, 1))), *tail)
    shards = None
    if spec.chunk == "proj" and length > PROJ_CHUNK:
        shards = (min(PROJ_SHARD, -(-length // PROJ_CHUNK) * PROJ_CHUNK), *tail)
    if spec.chunk == "frame":
        chunks = (1, *tail)
        frames = min(FRAME_SHARD, length) if shard_frames is None else shard_frames
        shards = (max(1, frames), *tail) if length > 0 else None
    if spec.dtype == "str":
        return group.create_array(name, shape=shape, chunks=chunks, dtype=str, compressors=None,
                                  overwrite=overwrite)
    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
                              compressors=blosc(), fill_value=0, overwrite=overwrite)


def check_dtype(name: str, data: np.ndarray) -> None:
    """Fail loudly when a writer passes the wrong dtype (a bug, not bad input)."""
    spec = ARRAYS[name]
    if spec.dtype != "str" and data.dtype != np.dtype(spec.dtype):
        raise TypeError(f"{name}: expected {spec.dtype}, got {data.dtype}")
