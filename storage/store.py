"""Open, create and write the Zarr v3 store (schema v2, see ``storage.schema``).

Scenes are written by independent processes: each writes ``scenes/.tmp-<id>`` and renames it to
``scenes/<id>`` only when every array is written (an atomic directory rename on a local file
system), so a crash or a failing disk never leaves a complete-looking half scene; ``.tmp-*``
leftovers are removed by ``remove_stale_tmp`` before the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from storage.errors import InputError
from storage.regions import RegionCaptions
from storage.schema import (
    ARRAYS,
    DEPTH_SCALE,
    FRAME_SHARD,
    LABEL_IMAGE_ARRAYS,
    SCHEMA_CHANGES,
    SCHEMA_VERSION,
    check_dtype,
    create_array,
)

TMP_PREFIX = ".tmp-"
CREATED_BY = "xmask3d-pipeline"


class StoreWriteError(RuntimeError):
    """Writing a scene failed (e.g. disk full); the partial scene was removed."""


def _read_root_meta(path: Path) -> dict[str, Any] | None:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{meta}: unreadable store metadata ({error})") from error


def _check_root(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise InputError(f"{path}: not a Zarr v3 group")
    attrs = meta.get("attributes", {})
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        changes = "; ".join(SCHEMA_CHANGES[v] for v in sorted(SCHEMA_CHANGES)
                            if isinstance(version, int) and version < v <= SCHEMA_VERSION)
        hint = f" ({changes}); preprocess the raw data again into a new store" if changes else ""
        raise InputError(f"{path}: store schema version {version}, this code reads version "
                         f"{SCHEMA_VERSION}{hint}")
    return attrs


class Scene:
    """One complete scene of a store; arrays are lazy zarr arrays (``scene['points/xyz']``)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.id = path.name
        self.attrs = dict(group.attrs)

    def __getitem__(self, name: str) -> zarr.Array:
        if name not in ARRAYS:
            raise KeyError(f"{name} is not in schema v{SCHEMA_VERSION}")
        return self.group[name]

    def __contains__(self, name: str) -> bool:
        return name in ARRAYS and name in self.group

    @property
    def num_frames(self) -> int:
        return int(self.attrs["num_frames"])

    @property
    def num_points(self) -> int:
        return int(self.attrs["num_points"])

    def view(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Visible points of frame ``i``: (point int32[M], uv uint16[M,2]) with uv = (column, row)."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"{self.id}: frame {i} out of range 0..{self.num_frames - 1}")
        lo, hi = (int(x) for x in self.group["proj/offsets"][i:i + 2])
        return self.group["proj/point"][lo:hi], self.group["proj/uv"][lo:hi]

    @property
    def has_label_images(self) -> bool:
        """True when the scene holds 2D label images (``frames/nyu40``, ``frames/category``)."""
        return self.attrs.get("label_images") is not None

    @property
    def has_region_captions(self) -> bool:
        """True when the scene holds region captions (the attr is written after their arrays)."""
        return self.attrs.get("region_captions") is not None

    def region_captions(self) -> RegionCaptions | None:
        """The scene's region captions, or None when it has none."""
        if not self.has_region_captions:
            return None
        g = self.group
        return RegionCaptions(
            frame=g["captions/region_frame"][:], box=g["captions/region_box"][:],
            text=[str(t) for t in g["captions/region_text"][:]], clip=g["captions/region_clip"][:],
            offsets=g["captions/region_offsets"][:], point=g["captions/region_point"][:])

    def depth_m(self, i: int) -> np.ndarray:
        """Depth of frame ``i`` in metres (float32, 0 = invalid)."""
        return self.group["frames/depth"][i].astype(np.float32) / np.float32(self.attrs["depth_scale"])


class Store:
    """A store opened for reading (and, for preprocessing, for adding scenes)."""

    def __init__(self, path: Path, attrs: dict[str, Any], writable: bool) -> None:
        self.path = path
        self.attrs = attrs
        self.writable = writable

    @property
    def scenes_dir(self) -> Path:
        return self.path / "scenes"

    def is_complete(self, scene_id: str) -> bool:
        meta = _read_root_meta(self.scenes_dir / scene_id)
        return bool(meta and meta.get("attributes", {}).get("complete"))

    def scene_ids(self, split: str | None = None) -> list[str]:
        """Complete scenes, sorted; optionally only those of ``split`` ('train', 'val', ...)."""
        if not self.scenes_dir.is_dir():
            return []
        ids = []
        for name in sorted(os.listdir(self.scenes_dir)):
            if name.startswith("."):
                continue
            meta = _read_root_meta(self.scenes_dir / name)
            attrs = (meta or {}).get("attributes", {})
            if attrs.get("complete") and (split is None or attrs.get("split") == split):
                ids.append(name)
        return ids

    def scene(self, scene_id: str) -> Scene:
        if not self.is_complete(scene_id):
            raise InputError(f"{self.path}: no complete scene {scene_id!r}")
        path = self.scenes_dir / scene_id
        return Scene(path, zarr.open_group(str(path), mode="r"))

    def add_region_captions(self, scene_id: str, regions: RegionCaptions, source: dict[str, Any]) -> None:
        """Write (or replace) the region captions of a complete scene in place.

        The attr ``region_captions`` is removed first and written last, after every array, so a
        scene that opens with the attr set holds a whole set of region arrays; an interrupted
        import leaves the scene without region captions (rerun the import). Importing while a
        training run reads the same scene is not supported.
        """
        if not self.writable:
            raise InputError(f"{self.path}: store opened read-only")
        scene = self.scene(scene_id)
        regions.check(scene.num_points, scene.num_frames, f"{self.path}/scenes/{scene_id}")
        if regions.clip.shape[1] != int(self.attrs.get("text_dim") or 0):
            raise InputError(f"{self.path}: region embeddings are {regions.clip.shape[1]}-d, the store's "
                             f"text space is {self.attrs.get('text_dim')}-d")
        group = zarr.open_group(str(scene.path), mode="r+")
        attrs = dict(group.attrs)
        attrs.pop("region_captions", None)
        group.attrs.put(attrs)  # invalidate first: never an old attr over new arrays
        write_region_arrays(group, regions)
        group.attrs["region_captions"] = {**source, "count": len(regions)}

    def writer(self, scene_id: str) -> SceneWriter:
        if not self.writable:
            raise InputError(f"{self.path}: store opened read-only")
        return SceneWriter(self, scene_id)


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open an existing store; ``mode='r+'`` to add scenes. Refuses other schema versions."""
    path = Path(path)
    if path.is_file():
        raise InputError(f"{path}: is a file, not a Zarr store directory")
    meta = _read_root_meta(path)
    if meta is None:
        raise InputError(f"{path}: no Zarr store here (zarr.json missing)")
    attrs = _check_root(path, meta)
    return Store(path, attrs, writable=mode != "r")


def create_store(path: str | Path, dataset: str, text_encoder: str | None, text_dim: int) -> Store:
    """Create a store, or open an existing compatible one for adding scenes.

    Refuses a file path, a non-empty directory that is not a store, a store of another schema
    version, and a store of another dataset or text encoder (its embeddings would not match).
    """
    path = Path(path)
    if path.is_file():
        raise InputError(f"{path}: is a file, not a Zarr store directory; refusing to overwrite it")
    meta = _read_root_meta(path)
    if meta is not None:
        attrs = _check_root(path, meta)
        if attrs.get("dataset") != dataset:
            raise InputError(f"{path}: store holds dataset {attrs.get('dataset')!r}, not {dataset!r}")
        if attrs.get("text_encoder") != text_encoder or attrs.get("text_dim") != text_dim:
            raise InputError(f"{path}: store captions were embedded with {attrs.get('text_encoder')!r} "
                             f"({attrs.get('text_dim')}-d), not {text_encoder!r}; use another store")
        store = Store(path, attrs, writable=True)
        store.scenes_dir.mkdir(exist_ok=True)
        return store
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{path}: directory exists and is not a Zarr store; refusing to write into it")
    try:
        root = zarr.open_group(str(path), mode="w-")
        attrs = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "created_by": CREATED_BY,
                 "text_encoder": text_encoder, "text_dim": int(text_dim)}
        root.attrs.update(attrs)
        root.create_group("scenes")
    except OSError as error:
        raise StoreWriteError(f"{path}: cannot create the store ({error})") from error
    return Store(path, attrs, writable=True)


def remove_stale_tmp(store: Store, scene_ids: list[str] | None = None) -> list[str]:
    """Delete ``scenes/.tmp-*`` left by crashed writers (only those of ``scene_ids`` if given)."""
    removed = []
    if not store.scenes_dir.is_dir():
        return removed
    for name in os.listdir(store.scenes_dir):
        if not name.startswith(TMP_PREFIX):
            continue
        if scene_ids is not None and name[len(TMP_PREFIX):] not in scene_ids:
            continue
        shutil.rmtree(store.scenes_dir / name, ignore_errors=True)
        removed.append(name)
    return removed


def write_array(group: zarr.Group, name: str, data: np.ndarray, overwrite: bool = False) -> None:
    """Write a whole schema array into a scene group (dtype checked; embeddings take their width)."""
    data = np.asarray(data)
    check_dtype(name, data)
    D = data.shape[1] if name in ("captions/clip", "captions/region_clip") else 0
    arr = create_array(group, name, len(data), D=D, overwrite=overwrite)
    if len(data):
        arr[...] = data


def write_region_arrays(group: zarr.Group, regions: RegionCaptions) -> None:
    """Write the ``captions/region_*`` arrays of ``regions`` into a scene group (replacing old ones)."""
    data = {
        "captions/region_frame": regions.frame.astype(np.int32),
        "captions/region_box": regions.box.astype(np.float32),
        "captions/region_text": np.asarray(regions.text, dtype=str) if len(regions) else np.zeros(0, str),
        "captions/region_clip": regions.clip.astype(np.float16),
        "captions/region_offsets": regions.offsets.astype(np.int64),
        "captions/region_point": regions.point.astype(np.int32),
    }
    for name, array in data.items():
        write_array(group, name, array, overwrite=True)


class SceneWriter:
    """Write one scene into ``scenes/.tmp-<id>``; ``commit`` renames it into place.

    Use as a context manager: leaving it with an exception (or without ``commit``) deletes the
    temporary group; an ``OSError`` (disk full, permissions) becomes a ``StoreWriteError``.
    Frames are buffered one shard at a time, so memory stays bounded for long scenes.
    """

    def __init__(self, store: Store, scene_id: str) -> None:
        if not scene_id or "/" in scene_id or scene_id.startswith("."):
            raise InputError(f"invalid scene id {scene_id!r}")
        self.store = store
        self.scene_id = scene_id
        self.tmp = store.scenes_dir / f"{TMP_PREFIX}{scene_id}"
        self.final = store.scenes_dir / scene_id
        self.group: zarr.Group | None = None
        self.committed = False
        self._frames: dict[str, Any] = {}
        self._region_source: dict[str, Any] | None = None

    def __enter__(self) -> SceneWriter:
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.group = zarr.open_group(str(self.tmp), mode="w")
        except OSError as error:
            raise StoreWriteError(f"{self.tmp}: cannot start writing scene {self.scene_id} ({error})") \
                from error
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreWriteError(f"{self.store.path}: writing scene {self.scene_id} failed ({exc}); "
                                  "the partial scene was removed") from exc

    def write(self, name: str, data: np.ndarray) -> None:
        """Write a whole array (points/*, frames/index|pose|intrinsic, proj/*, captions/*)."""
        write_array(self.group, name, data)

    def write_regions(self, regions: RegionCaptions, source: dict[str, Any]) -> None:
        """Region captions of the scene being written; recorded as attr ``region_captions`` at commit."""
        write_region_arrays(self.group, regions)
        self._region_source = {**source, "count": len(regions)}

    def begin_frames(self, max_frames: int, size: tuple[int, int], label_images: bool = False) -> None:
        """Create frames/color and frames/depth (and with ``label_images`` frames/nyu40 and
        frames/category) for up to ``max_frames`` frames of ``size`` (W, H)."""
        W, H = size
        shard = max(1, min(FRAME_SHARD, max_frames))
        names = ("frames/color", "frames/depth", *(LABEL_IMAGE_ARRAYS if label_images else ()))
        self._frames = {
            "arrays": {n: create_array(self.group, n, max_frames, H=H, W=W, shard_frames=shard)
                       for n in names},
            "shard": shard, "count": 0, "written": 0, "buffer": [], "size": (W, H),
        }
        self._frames["arrays"]["frames/depth"].attrs["depth_scale"] = DEPTH_SCALE

    def add_frame(self, color: np.ndarray, depth_mm: np.ndarray,
                  labels: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Append one frame: color uint8 [H,W,3], depth uint16 [H,W] millimetres and, when the
        frames were begun with label images, ``labels`` = (nyu40 uint8 [H,W], category uint16 [H,W])."""
        state = self._frames
        arrays = state["arrays"]
        images = {"frames/color": color, "frames/depth": depth_mm,
                  **dict(zip(LABEL_IMAGE_ARRAYS, labels or (), strict=False))}
        if set(images) != set(arrays):
            raise ValueError(f"{self.scene_id}: frame arrays {sorted(images)}, begun with {sorted(arrays)}")
        for name, image in images.items():
            check_dtype(name, image)
        if state["count"] >= arrays["frames/color"].shape[0]:
            raise ValueError(f"{self.scene_id}: more frames than announced "
                             f"({arrays['frames/color'].shape[0]})")
        state["buffer"].append(images)
        state["count"] += 1
        if len(state["buffer"]) == state["shard"]:
            self._flush_frames()

    def _flush_frames(self) -> None:
        state = self._frames
        if not state["buffer"]:
            return
        lo = state["written"]
        hi = lo + len(state["buffer"])
        for name, array in state["arrays"].items():
            array[lo:hi] = np.stack([images[name] for images in state["buffer"]])
        state["written"] = hi
        state["buffer"] = []

    def end_frames(self) -> int:
        """Write the last partial shard and trim the arrays to the frames actually added."""
        state = self._frames
        self._flush_frames()
        n = state["count"]
        for array in state["arrays"].values():
            if array.shape[0] != n:
                array.resize((n, *array.shape[1:]))
        return n

    def commit(self, attrs: dict[str, Any]) -> Path:
        """Record the scene attrs, mark complete and rename into place (replacing an old copy)."""
        try:
            regions = {"region_captions": self._region_source} if self._region_source else {}
            self.group.attrs.update({**attrs, **regions, "complete": True})
            old = None
            if self.final.exists():
                old = self.final.with_name(f"{TMP_PREFIX}old-{self.scene_id}-{os.getpid()}")
                os.rename(self.final, old)
            os.rename(self.tmp, self.final)
        except OSError as error:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise StoreWriteError(f"{self.store.path}: committing scene {self.scene_id} failed ({error}); "
                                  "the partial scene was removed") from error
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final
