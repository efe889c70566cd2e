"""Open, create and write the Zarr v3 store (schema v2, see ``storage.schema``); the protocol is
in docs/store.md.

The commit protocol needs no directory rename (object storage has none). A scene is complete
only when its group's ``complete`` attribute is set, in the one write of the scene's
``zarr.json`` that follows every array; readers list only complete scenes. Its ``fingerprint``
attribute records the settings and source files that made it, so a scene made otherwise is
rewritten, not skipped. A writer first takes the scene's claim (``scenes/.claim-<id>``, a lease
created exclusively, see ``storage.lease``): a new scene is written in place; a complete scene is
replaced by writing ``scenes/.new-<id>`` first, then swapping it in (the old copy is invalidated,
its files replaced by the new ones, the new ``zarr.json`` written last) while ``.new-<id>`` stays
complete until the swap is done, so a crash at any point leaves one complete copy, and the next
writer (or ``recover_store``) finishes the swap. Leftovers are removed only under their claim,
i.e. when their writer is gone. A run holds the store's writer lock (``store_lock``) so a second
run waits or fails with a line naming the owner.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from storage.errors import InputError
from storage.lease import STALE_AFTER_S, Lease, LeaseHeldError, LeaseLostError, put_bytes
from storage.objects import AnyPath, as_path, is_object_path, link_or_copy, listdir, open_group, remove_tree
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

CREATED_BY = "xmask3d-pipeline"
LOCK_NAME = ".writer.lock"  # the store's writer lock, in the store root
CLAIM_PREFIX = ".claim-"  # scenes/.claim-<id>: who is writing scene <id>
NEW_PREFIX = ".new-"  # scenes/.new-<id>: the replacement of a complete scene, before the swap
LEGACY_TMP_PREFIX = ".tmp-"  # scenes/.tmp-<id>, .tmp-old-<id>-<pid>: left by the rename protocol
PARTIAL_SUFFIX = ".partial"  # a whole-object write in progress (locally a temporary file)

# Scene states returned by Store.scene_state
MISSING, INCOMPLETE, COMPLETE, OTHER_SETTINGS = "missing", "incomplete", "complete", "other-settings"


class StoreWriteError(RuntimeError):
    """Writing a scene failed (e.g. disk full); the partial scene was removed."""


def _read_json(path: AnyPath) -> dict[str, Any] | None:
    """A JSON object file; None when missing or unreadable (a scene being written)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_root_meta(path: AnyPath) -> dict[str, Any] | None:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{meta}: unreadable store metadata ({error})") from error


def _check_root(path: AnyPath, meta: dict[str, Any]) -> dict[str, Any]:
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


def _group_meta(attrs: dict[str, Any]) -> bytes:
    return json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


def _normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def _scene_attrs(scene_dir: AnyPath) -> dict[str, Any] | None:
    meta = _read_json(scene_dir / "zarr.json")
    return None if meta is None else meta.get("attributes", {})


def _complete(scene_dir: AnyPath) -> bool:
    return bool((_scene_attrs(scene_dir) or {}).get("complete"))


def _remove_tree(path: AnyPath) -> None:
    """Delete a scene group, its ``zarr.json`` first (a half-deleted group never looks complete)."""
    if path.is_dir():
        (path / "zarr.json").unlink(missing_ok=True)
        remove_tree(path)
    elif path.exists():
        path.unlink()


def _is_leftover(name: str) -> bool:
    return name.startswith((CLAIM_PREFIX, NEW_PREFIX, LEGACY_TMP_PREFIX)) or name.endswith(PARTIAL_SUFFIX)


def _leftover_scene(name: str) -> str | None:
    """The scene id a ``scenes/`` leftover belongs to (claims, replacements, legacy temporaries)."""
    for suffix in (".break",):
        name = name.removesuffix(suffix)
    if name.startswith(CLAIM_PREFIX):
        return name[len(CLAIM_PREFIX):]
    if name.startswith(NEW_PREFIX):
        return name[len(NEW_PREFIX):]
    if name.startswith(LEGACY_TMP_PREFIX + "old-"):
        return name[len(LEGACY_TMP_PREFIX + "old-"):].rsplit("-", 1)[0]
    if name.startswith(LEGACY_TMP_PREFIX):
        return name[len(LEGACY_TMP_PREFIX):]
    return None


class Scene:
    """One complete scene of a store; arrays are lazy zarr arrays (``scene['points/xyz']``)."""

    def __init__(self, path: AnyPath, group: zarr.Group) -> None:
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

    def __init__(self, path: AnyPath, attrs: dict[str, Any], writable: bool) -> None:
        self.path = path
        self.attrs = attrs
        self.writable = writable

    @property
    def scenes_dir(self) -> AnyPath:
        return self.path / "scenes"

    def claim_path(self, scene_id: str) -> AnyPath:
        return self.scenes_dir / f"{CLAIM_PREFIX}{scene_id}"

    def is_complete(self, scene_id: str) -> bool:
        """Whether scene ``scene_id`` carries its completion marker (whatever made it)."""
        return _complete(self.scenes_dir / scene_id)

    def scene_state(self, scene_id: str, fingerprint: dict[str, Any]) -> str:
        """``complete`` (marker set, made with ``fingerprint``), ``other-settings`` (marker set,
        another or no fingerprint), ``incomplete`` (a group without the marker) or ``missing``."""
        attrs = _scene_attrs(self.scenes_dir / scene_id)
        if attrs is None:
            return INCOMPLETE if (self.scenes_dir / scene_id).exists() else MISSING
        if not attrs.get("complete"):
            return INCOMPLETE
        return COMPLETE if attrs.get("fingerprint") == _normalize(fingerprint) else OTHER_SETTINGS

    def scene_is_complete(self, scene_id: str, fingerprint: dict[str, Any]) -> bool:
        """True only for a complete scene made with exactly ``fingerprint`` (skip it)."""
        return self.scene_state(scene_id, fingerprint) == COMPLETE

    def changed_settings(self, scene_id: str, fingerprint: dict[str, Any]) -> list[str]:
        """The fingerprint entries of a stored scene that differ from ``fingerprint`` ("a: old -> new")."""
        stored = (_scene_attrs(self.scenes_dir / scene_id) or {}).get("fingerprint")
        if stored is None:
            return ["fingerprint: none recorded"]
        new = _normalize(fingerprint)
        out = []
        for key in sorted(set(stored) | set(new)):
            if stored.get(key) != new.get(key):
                old_v, new_v = stored.get(key), new.get(key)
                if isinstance(old_v, dict) and isinstance(new_v, dict):
                    files = sorted(k for k in set(old_v) | set(new_v) if old_v.get(k) != new_v.get(k))
                    out.append(f"{key}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} changed")
                else:
                    out.append(f"{key}: {old_v} -> {new_v}")
        return out

    def scene_ids(self, split: str | None = None) -> list[str]:
        """Complete scenes, sorted; optionally only those of ``split`` ('train', 'val', ...)."""
        if not self.scenes_dir.is_dir():
            return []
        ids = []
        for name in sorted(listdir(self.scenes_dir)):
            if name.startswith(".") or name == "zarr.json":
                continue
            attrs = _scene_attrs(self.scenes_dir / name) or {}
            if attrs.get("complete") and (split is None or attrs.get("split") == split):
                ids.append(name)
        return ids

    def scene(self, scene_id: str) -> Scene:
        if not self.is_complete(scene_id):
            raise InputError(f"{self.path}: no complete scene {scene_id!r}")
        path = self.scenes_dir / scene_id
        return Scene(path, open_group(path, mode="r"))

    @contextlib.contextmanager
    def claim(self, scene_id: str, purpose: str) -> Iterator[Lease]:
        """Hold scene ``scene_id``'s claim; ``LeaseHeldError`` naming the owner when it is taken."""
        _check_scene_id(scene_id)
        lease = Lease(self.claim_path(scene_id), purpose)
        lease.acquire(what=f"{self.path}: scene {scene_id}")
        try:
            yield lease
        finally:
            lease.release()

    def add_region_captions(self, scene_id: str, regions: RegionCaptions, source: dict[str, Any]) -> None:
        """Write (or replace) the region captions of a complete scene in place, under its claim.

        The attr ``region_captions`` is removed first and written last, after every array, so a
        scene that opens with the attr set holds a whole set of region arrays; an interrupted
        import leaves the scene without region captions (rerun the import). Importing while a
        training run reads the same scene is not supported.
        """
        if not self.writable:
            raise InputError(f"{self.path}: store opened read-only")
        with self.claim(scene_id, f"import region captions into {scene_id}"):
            scene = self.scene(scene_id)
            regions.check(scene.num_points, scene.num_frames, f"{self.path}/scenes/{scene_id}")
            if regions.clip.shape[1] != int(self.attrs.get("text_dim") or 0):
                raise InputError(f"{self.path}: region embeddings are {regions.clip.shape[1]}-d, the "
                                 f"store's text space is {self.attrs.get('text_dim')}-d")
            group = open_group(scene.path, mode="r+")
            attrs = dict(group.attrs)
            attrs.pop("region_captions", None)
            group.attrs.put(attrs)  # invalidate first: never an old attr over new arrays
            write_region_arrays(group, regions)
            group.attrs["region_captions"] = {**source, "count": len(regions)}

    def writer(self, scene_id: str, fingerprint: dict[str, Any] | None = None) -> SceneWriter:
        """A writer of scene ``scene_id``; ``fingerprint``: the settings and sources that make it."""
        if not self.writable:
            raise InputError(f"{self.path}: store opened read-only")
        return SceneWriter(self, scene_id, fingerprint)

    # -- recovery (the caller holds the scene's claim) ----------------------------------------

    def _recover_scene(self, scene_id: str) -> list[str]:
        """Finish or undo what a dead writer of ``scene_id`` left; -> what was done (one line each)."""
        final = self.scenes_dir / scene_id
        new = self.scenes_dir / f"{NEW_PREFIX}{scene_id}"
        done = []
        if _complete(new):
            final_attrs = _scene_attrs(final) or {}
            if final_attrs.get("complete") and \
                    final_attrs.get("write_token") == (_scene_attrs(new) or {}).get("write_token"):
                _remove_tree(new)
                done.append(f"removed {new.name} (already swapped in)")
            else:
                self._swap_in(scene_id, new)
                done.append(f"finished replacing scene {scene_id} from {new.name}")
        elif new.exists():
            _remove_tree(new)
            done.append(f"removed unfinished replacement {new.name}")
        legacy = [self.scenes_dir / f"{LEGACY_TMP_PREFIX}{scene_id}",
                  *sorted(self.scenes_dir.glob(f"{LEGACY_TMP_PREFIX}old-{scene_id}-*"))]
        for path in legacy:
            if not path.exists():
                continue
            if _complete(path) and not _complete(final):
                self._swap_in(scene_id, path)
                done.append(f"restored scene {scene_id} from {path.name}")
            else:
                _remove_tree(path)
                done.append(f"removed {path.name}")
        if final.exists() and not _complete(final):
            _remove_tree(final)
            done.append(f"removed unfinished scene {scene_id}")
        return done

    def _swap_in(self, scene_id: str, source: AnyPath) -> None:
        """Replace ``scenes/<id>`` by the complete group ``source``; safe to redo after a crash.

        The old copy is invalidated (marker removed) and emptied, the files of ``source`` are
        linked (or copied) in, and ``source``'s ``zarr.json`` is written last, marker included;
        ``source`` is removed only after that. Object storage: copy objects instead of linking.
        """
        final = self.scenes_dir / scene_id
        meta = (source / "zarr.json").read_bytes()
        attrs = _scene_attrs(final)
        if attrs is not None and attrs.get("complete"):
            put_bytes(final / "zarr.json", _group_meta({k: v for k, v in attrs.items() if k != "complete"}))
        final.mkdir(exist_ok=True)
        for child in final.iterdir():
            if child.name != "zarr.json":
                _remove_tree(child)
        for src in sorted(source.rglob("*")):
            rel = src.relative_to(source)
            if str(rel) == "zarr.json" or src.name.endswith(PARTIAL_SUFFIX) or \
                    (not is_object_path(src) and src.is_dir()):  # rglob lists objects only in a bucket
                continue
            dst = final / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src, dst)
        put_bytes(final / "zarr.json", meta)
        _remove_tree(source)


def _check_scene_id(scene_id: str) -> None:
    if not scene_id or "/" in scene_id or scene_id.startswith(".") or scene_id == "zarr.json":
        raise InputError(f"invalid scene id {scene_id!r}")


def _only_create_leftovers(path: AnyPath) -> bool:
    """True when ``path`` holds nothing but what ``create_store`` and ``store_lock`` write."""
    def names(d: AnyPath) -> set[str]:
        return {n for n in listdir(d) if not n.endswith(PARTIAL_SUFFIX)}

    top = names(path) - {LOCK_NAME, LOCK_NAME + ".break"}
    if not top <= {"zarr.json", "scenes"}:
        return False
    scenes = path / "scenes"
    return not scenes.exists() or (scenes.is_dir() and names(scenes) <= {"zarr.json"})


def _root_state(path: AnyPath) -> str:
    """What is at a store path: ``missing`` (nothing, or an empty directory), ``partial`` (left by
    a killed ``create_store``: no complete root metadata, nothing else) or ``store``.

    Raises InputError for a file, a directory that is not a store, and a store whose root
    metadata is unreadable or lacks ``schema_version`` while it holds more than a create leaves.
    """
    if path.is_file():
        raise InputError(f"{path}: is a file, not a Zarr store directory")
    if not path.is_dir() or not any(not n.endswith(PARTIAL_SUFFIX) for n in listdir(path)):
        return MISSING
    leftovers = _only_create_leftovers(path)
    if (path / "zarr.json").is_file():
        meta = _read_json(path / "zarr.json")
        if meta is not None and "schema_version" in (meta.get("attributes") or {}):
            return "store"
        if meta is not None and (meta.get("node_type") != "group" or meta.get("zarr_format") != 3):
            return "store"  # _check_root names what it is not
        if leftovers:
            return "partial"
        raise InputError(f"{path}/zarr.json: store metadata unreadable or without schema_version, and the "
                         "directory holds more than an interrupted create leaves; not touching it")
    if leftovers:
        return "partial" if set(listdir(path)) - {LOCK_NAME, LOCK_NAME + ".break"} else MISSING
    raise InputError(f"{path}: directory exists and is not a Zarr store; refusing to write into it")


def open_store(path: str | AnyPath, mode: str = "r") -> Store:
    """Open an existing store; ``mode='r+'`` to add scenes. Refuses other schema versions."""
    path = as_path(path)
    if path.is_file():
        raise InputError(f"{path}: is a file, not a Zarr store directory")
    if path.is_dir() and _only_create_leftovers(path) and \
            ((path / "zarr.json").exists() or (path / "scenes").exists()):
        meta = _read_json(path / "zarr.json")
        if meta is None or "schema_version" not in (meta.get("attributes") or {}):
            raise InputError(f"{path}: an interrupted store creation left incomplete metadata; rerun "
                             "preprocess on it to finish creating the store")
    meta = _read_root_meta(path)
    if meta is None:
        raise InputError(f"{path}: no Zarr store here (zarr.json missing)")
    attrs = _check_root(path, meta)
    return Store(path, attrs, writable=mode != "r")


def create_store(path: str | AnyPath, dataset: str, text_encoder: str | None, text_dim: int) -> Store:
    """Create a store, or open an existing compatible one for adding scenes.

    The root metadata is written complete in one write, after ``scenes/``: a killed create leaves
    no store or a partial one, which the next create finishes. Refuses a file path, a non-empty
    directory that is not a store, a store of another schema version, and a store of another
    dataset or text encoder (its embeddings would not match).
    """
    path = as_path(path)
    state = _root_state(path)
    if state == "store":
        attrs = _check_root(path, _read_root_meta(path) or {})
        if attrs.get("dataset") != dataset:
            raise InputError(f"{path}: store holds dataset {attrs.get('dataset')!r}, not {dataset!r}")
        if attrs.get("text_encoder") != text_encoder or attrs.get("text_dim") != text_dim:
            raise InputError(f"{path}: store captions were embedded with {attrs.get('text_encoder')!r} "
                             f"({attrs.get('text_dim')}-d), not {text_encoder!r}; use another store")
        store = Store(path, attrs, writable=True)
        store.scenes_dir.mkdir(exist_ok=True)
        return store
    attrs = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "created_by": CREATED_BY,
             "text_encoder": text_encoder, "text_dim": int(text_dim)}
    try:
        for folder in (path, path / "scenes"):  # temporaries of the killed create
            for name in listdir(folder) if folder.is_dir() else []:
                if name.endswith(PARTIAL_SUFFIX):
                    (folder / name).unlink(missing_ok=True)
        put_bytes(path / "scenes" / "zarr.json", _group_meta({}))
        put_bytes(path / "zarr.json", _group_meta(attrs))  # the store exists from this write on
    except OSError as error:
        raise StoreWriteError(f"{path}: cannot create the store ({error})") from error
    return Store(path, attrs, writable=True)


@contextlib.contextmanager
def store_lock(path: str | AnyPath, purpose: str, wait_s: float = 0.0) -> Iterator[Lease]:
    """Hold the store's writer lock (``<store>/.writer.lock``) for a run that writes scenes.

    A second run waits up to ``wait_s`` seconds, then fails with ``LeaseHeldError`` (an
    InputError) naming the store and the owner (pid, host, since when, last heartbeat). A lock
    whose owner is gone is taken over. The path is checked first (no lock is put into a file's
    place or a foreign directory); a directory made only for the lock is removed again.
    """
    path = as_path(path)
    made = _root_state(path) == MISSING and not path.exists()
    lease = Lease(path / LOCK_NAME, purpose)
    try:
        lease.acquire(wait_s, what=f"{path}: the store's writer lock")
    except LeaseHeldError:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    try:
        yield lease
    finally:
        lease.release()
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: a failed run leaves nothing behind


def recover_store(store: Store, stale_partial_s: float = STALE_AFTER_S) -> list[str]:
    """Finish or remove what dead writers left in ``scenes/``; -> one line per action.

    Each scene with leftovers (a claim, ``.new-<id>``, a group without its marker, legacy
    ``.tmp-*``) is handled under its claim, so entries of a live writer are never touched:
    a complete replacement is swapped in, anything unfinished is deleted. Stray ``*.partial``
    files older than ``stale_partial_s`` are deleted.
    """
    done: list[str] = []
    if not store.scenes_dir.is_dir():
        return done
    ids: set[str] = set()
    now = time.time()
    for name in listdir(store.scenes_dir):
        path = store.scenes_dir / name
        if name.endswith(PARTIAL_SUFFIX):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > stale_partial_s:
                    path.unlink()
            continue
        scene_id = _leftover_scene(name) if name.startswith(".") else None
        if scene_id is None and not name.startswith(".") and name != "zarr.json" and not _complete(path):
            scene_id = name
        if scene_id:
            ids.add(scene_id)
    for scene_id in sorted(ids):
        try:
            _check_scene_id(scene_id)
        except InputError:
            continue  # not a name a writer makes
        try:
            with store.claim(scene_id, f"recover {scene_id}"):
                done += store._recover_scene(scene_id)
        except LeaseHeldError:
            continue  # a live writer is on it
    return done


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
    """Write one scene under its claim; ``commit`` sets the completion marker last.

    Use as a context manager. Entering takes the claim ``scenes/.claim-<id>`` (``LeaseHeldError``
    naming the live owner when another process writes the scene: two writers never both commit)
    and recovers what a dead writer of the scene left. A scene that is not complete is written in
    place; a complete one is replaced through ``scenes/.new-<id>`` and a swap (see the module
    docstring). Leaving without ``commit`` (an exception) deletes what this writer wrote; an
    ``OSError`` (disk full, permissions) becomes a ``StoreWriteError``. Frames are buffered one
    shard at a time, so memory stays bounded for long scenes.
    """

    def __init__(self, store: Store, scene_id: str, fingerprint: dict[str, Any] | None = None) -> None:
        _check_scene_id(scene_id)
        self.store = store
        self.scene_id = scene_id
        self.fingerprint = _normalize(fingerprint) if fingerprint is not None else None
        self.final = store.scenes_dir / scene_id
        self.target = self.final  # where the arrays go: the scene itself, or .new-<id> to replace it
        self.replacing = False
        self.recovered: list[str] = []
        self.group: zarr.Group | None = None
        self.committed = False
        self.claim = Lease(store.claim_path(scene_id), f"write scene {scene_id}")
        self._frames: dict[str, Any] = {}
        self._region_source: dict[str, Any] | None = None

    def __enter__(self) -> SceneWriter:
        self.claim.acquire(what=f"{self.store.path}: scene {self.scene_id}")
        try:
            self.recovered = self.store._recover_scene(self.scene_id)
            self.replacing = _complete(self.final)
            if self.replacing:
                self.target = self.store.scenes_dir / f"{NEW_PREFIX}{self.scene_id}"
            self.group = open_group(self.target, mode="w")
        except OSError as error:
            self.claim.release()
            raise StoreWriteError(f"{self.target}: cannot start writing scene {self.scene_id} ({error})") \
                from error
        except BaseException:
            self.claim.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed and not self.claim.lost:
                with contextlib.suppress(OSError):
                    _remove_tree(self.target)
        finally:
            self.claim.release()
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

    def commit(self, attrs: dict[str, Any]) -> AnyPath:
        """Record the attrs with the fingerprint and the completion marker (one write, after every
        array); when replacing, swap the new copy in. Fails if the claim was lost meanwhile."""
        try:
            self.claim.check()
        except LeaseLostError as error:
            raise StoreWriteError(f"{self.store.path}: scene {self.scene_id} not committed: {error}") \
                from error
        try:
            regions = {"region_captions": self._region_source} if self._region_source else {}
            self.group.attrs.update({**attrs, **regions, "fingerprint": self.fingerprint,
                                     "write_token": uuid.uuid4().hex, "complete": True})
            if self.replacing:
                self.store._swap_in(self.scene_id, self.target)
        except OSError as error:
            if self.replacing and _complete(self.target):
                self.committed = True  # the complete new copy stays; the next writer finishes the swap
                raise StoreWriteError(f"{self.store.path}: replacing scene {self.scene_id} was interrupted "
                                      f"({error}); the next run finishes it") from error
            raise StoreWriteError(f"{self.store.path}: committing scene {self.scene_id} failed ({error}); "
                                  "the partial scene was removed") from error
        self.committed = True
        return self.final
