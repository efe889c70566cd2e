"""Import the released PLA / RegionPLC caption files into a store as region captions.

Both releases pair a caption JSON ``{scene_id: {name: text}}`` with a point-index pickle whose names
equal the JSON keys (CAPTION_SUPERVISION_SPEC.md, sections 1-2):

- RegionPLC: JSON keys ``"<frame>_<k>"`` (box ``k`` of frame ``<frame>``) and ``"app_<j>_<n>"``
  (regions merged in from another source); the pickle is a *list* in sorted scene order of
  ``{'scene_name', 'infos': {key: indices}, 'boxes': {frame: (K, 4) [y_min, x_min, y_max, x_max]}}``;
- PLA: view keys (the frame stem, e.g. ``"000100"``) or entity keys (``"entity_<k>"``); the pickle
  is a *dict* ``{scene_id: {key: torch.IntTensor}}``.

Indices point into the scene's original points, which are the store's ``points/*`` rows (this
pipeline neither subsamples nor reorders them). The pickles are read with a restricted unpickler
that only builds containers and integer index arrays: a pickle can run any code on load, and these
files come from third-party download links.

``import_captions`` writes ``captions/region_*`` into each complete scene of the store found in the
files (``Store.add_region_captions``); ``write_regionplc_files`` / ``write_pla_files`` write a
store's region captions back in the released formats (worked example, tests).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.captions import embed_captions, read_json_file
from preprocessing.text import build_text_encoder, text_encoder_info
from storage.errors import InputError
from storage.objects import as_path
from storage.regions import RegionCaptions
from storage.store import Store, open_store, store_lock

FORMATS = ("regionplc", "pla")
PLA_LEVELS = ("view", "entity")

# Module names that protocol 0-2 pickles written by Python 2 (or numpy < 2) use.
_RENAMED_MODULES = {"__builtin__": "builtins", "numpy.core.multiarray": "numpy._core.multiarray",
                    "numpy.core.numeric": "numpy._core.numeric"}
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "int", "bytes", "bytearray")
_REGION_KEY = re.compile(r"^(\d+)_(\d+)$", re.ASCII)  # RegionPLC "<frame>_<k>"
_VIEW_KEY = re.compile(r"^\d+$", re.ASCII)  # PLA view key: the frame stem, e.g. "000100"


# ---------------------------------------------------------------------------------------------
# Reading the point-index pickle safely


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2 layout, resolved on demand
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # numpy < 2 layout
    return {
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,  # protocol 5
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def _load_storage_from_bytes(data: bytes) -> Any:
    """Stands in for ``torch.storage._load_from_bytes``, which calls ``torch.load(weights_only=False)``."""
    import torch  # heavy: only for files that hold torch tensors

    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError("tensor storage is not bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True)


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> Any:
    """``torch._utils._rebuild_tensor_v2`` for a plain storage, without hooks or gradients."""
    import torch  # heavy: only for files that hold torch tensors

    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError("tensor storage is not a torch storage")
    if backward_hooks:
        raise pickle.UnpicklingError("tensor carries backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                           OrderedDict())


def _allowed_global(module: str, name: str) -> Any | None:
    if module == "builtins" and name in _BUILTINS:
        return getattr(__import__("builtins"), name)
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if (module, name) == ("_codecs", "encode"):  # bytes in protocol 0-2 pickles
        import _codecs  # the pickle opcode target itself, resolved on demand

        return _codecs.encode
    if module.startswith("numpy"):
        return _numpy_globals().get((module, name))
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return _rebuild_tensor
    if (module, name) == ("torch.storage", "_load_from_bytes"):
        return _load_storage_from_bytes
    return None


class _IndexUnpickler(pickle.Unpickler):
    """Builds only containers, strings, ints, numpy arrays and torch tensors (``find_class``)."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(_RENAMED_MODULES.get(module, module), name)
        if found is None:
            raise InputError(f"{self.path}: refusing to unpickle {module}.{name} "
                             "(only dicts, lists and integer index arrays are accepted)")
        return found


def _index_array(value: Any, path: Path, scene: str, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    where = f"{path}: scene {scene!r} key {name!r}"
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InputError(f"{where}: index tensor has dtype {value.dtype}, expected integers")
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise InputError(f"{where}: expected an integer index array, got {type(value).__name__}")
    if value.dtype.kind not in "iu":
        raise InputError(f"{where}: index array has dtype {value.dtype}, expected integers")
    if value.ndim != 1:
        raise InputError(f"{where}: expected a 1-D index array, got shape {value.shape}")
    return value


def _infos(infos: Any, path: Path, scene: str) -> dict[str, np.ndarray]:
    if not isinstance(infos, dict):
        raise InputError(f"{path}: scene {scene!r}: expected a dict {{name: indices}}, "
                         f"got {type(infos).__name__}")
    out = {}
    for name, value in infos.items():
        if not isinstance(name, str):
            raise InputError(f"{path}: scene {scene!r}: key {name!r} is not a string")
        out[name] = _index_array(value, path, scene, name)
    return out


def _normalise_index(raw: Any, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Form (a) ``{scene: {name: indices}}`` or (b) ``[{'scene_name', 'infos', 'boxes'?}]`` -> form (a)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if isinstance(raw, dict):
        for scene, infos in raw.items():
            if not isinstance(scene, str):
                raise InputError(f"{path}: scene id {scene!r} is not a string")
            out[scene] = _infos(infos, path, scene)
        return out
    if isinstance(raw, list | tuple):
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("scene_name"), str) \
                    or "infos" not in item:
                raise InputError(f"{path}: list item {i} is not a "
                                 "{'scene_name': str, 'infos': dict} record")
            scene = item["scene_name"]
            if scene in out:
                raise InputError(f"{path}: scene {scene!r} is listed twice")
            out[scene] = _infos(item["infos"], path, scene)
        return out
    raise InputError(f"{path}: expected {{scene: {{name: indices}}}} or a list of "
                     f"{{'scene_name', 'infos'}} records, got {type(raw).__name__}")


def safe_load_index_pickle(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read a PLA / RegionPLC point-index pickle: scene -> name -> 1-D integer index array.

    Either form is accepted (dict ``{scene: {name: indices}}`` or the RegionPLC list of
    ``{'scene_name', 'infos', 'boxes'}``; ``boxes`` is not returned). Values may be numpy arrays or
    torch tensors (returned as numpy). InputError for anything that is not containers and integer
    arrays (no code from the file is ever run), a truncated/corrupt file or a malformed structure.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: index pickle not found")
    try:
        with path.open("rb") as f:
            raw = _IndexUnpickler(f, path).load()
    except InputError:
        raise
    except MemoryError as error:
        raise InputError(f"{path}: not a readable index pickle (out of memory)") from error
    except Exception as error:  # truncated/corrupt files fail in many ways
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(error):
            raise InputError(f"{path}: refusing to unpickle a tensor storage with foreign objects "
                             "(only dicts, lists and integer index arrays are accepted)") from error
        raise InputError(f"{path}: truncated or corrupt index pickle ({type(error).__name__}: "
                         f"{first[:200]})") from error
    return _normalise_index(raw, path)


# ---------------------------------------------------------------------------------------------
# Reading the caption JSON


def load_caption_json(path: str | Path) -> dict[str, dict[str, str]]:
    """Read a view / entity / region caption JSON: scene -> name -> caption text."""
    raw = read_json_file(path, "caption")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object {{scene_id: {{name: caption}}}}")
    out: dict[str, dict[str, str]] = {}
    for scene, caps in raw.items():
        if isinstance(caps, str):
            raise InputError(f"{path}: scene {scene!r} has one string: a PLA scene-level caption file has "
                             "no point sets; pass the view, entity or region caption file")
        if not isinstance(caps, dict):
            raise InputError(f"{path}: scene {scene!r} must map names to captions, got {type(caps).__name__}")
        for name, text in caps.items():
            if not isinstance(text, str):
                raise InputError(f"{path}: scene {scene!r} key {name!r}: caption is not a string")
        out[scene] = caps
    return out


# ---------------------------------------------------------------------------------------------
# Import


@dataclass
class SceneImport:
    """What the import did to one scene of the store.

    ``status``: ``imported``; ``missing`` (in neither file); ``no-index`` / ``no-captions`` (in one
    file only: nothing written). Key counts: ``no_index`` caption keys without an index set,
    ``no_caption`` index keys without a caption (RegionPLC's files can disagree, spec pitfall 5),
    ``empty`` empty index sets and ``blank`` blank captions (both dropped), ``with_frame`` imported
    regions tied to a frame the store keeps.
    """

    scene_id: str
    status: str
    regions: int = 0
    with_frame: int = 0
    no_index: int = 0
    no_caption: int = 0
    empty: int = 0
    blank: int = 0


@dataclass
class ImportSummary:
    store: Path
    format: str
    captions: Path
    index: Path
    text_encoder: str
    scenes: list[SceneImport] = field(default_factory=list)
    not_in_store: list[str] = field(default_factory=list)  # scenes of the files the store lacks

    @property
    def imported(self) -> list[SceneImport]:
        return [s for s in self.scenes if s.status == "imported"]

    def table(self) -> str:
        """A plain-text per-scene table (for the command line)."""
        lines = [f"{'scene':<24} {'status':<11} {'regions':>7} {'w/frame':>7} {'no-index':>8} "
                 f"{'no-caption':>10} {'empty':>5} {'blank':>5}"]
        for s in self.scenes:
            lines.append(f"{s.scene_id:<24} {s.status:<11} {s.regions:>7} {s.with_frame:>7} {s.no_index:>8} "
                         f"{s.no_caption:>10} {s.empty:>5} {s.blank:>5}")
        missing = [s.scene_id for s in self.scenes if s.status != "imported"]
        lines.append(f"{len(self.imported)} scenes imported ({sum(s.regions for s in self.scenes)} regions, "
                     f"{self.text_encoder}), {len(missing)} store scenes not in both files, "
                     f"{len(self.not_in_store)} file scenes not in the store")
        return "\n".join(lines)


def _key_frame(fmt: str, key: str) -> int | None:
    """Frame number named by a key: RegionPLC ``"000100_3"`` / PLA view ``"000100"`` -> 100."""
    if fmt == "regionplc":
        match = _REGION_KEY.match(key)
        return int(match.group(1)) if match else None
    return int(key) if _VIEW_KEY.match(key) else None


def _resolve_encoder(store: Store, text_encoder: Any) -> tuple[Any, str]:
    """(encoder or spec to build, name) matching the store's recorded text encoder."""

    name, dim = store.attrs.get("text_encoder"), store.attrs.get("text_dim")
    if name is None:
        raise InputError(f"{store.path}: the store has no text encoder (preprocessed without captions); "
                         "region phrases need the store's text space")
    if text_encoder is None or isinstance(text_encoder, str):
        spec = name if text_encoder is None else text_encoder
        try:
            got = text_encoder_info(spec)
        except InputError as error:
            if text_encoder is None and name.startswith("openclip:"):
                raise InputError(f"{store.path}: store text encoder {name!r} needs its checkpoint: pass "
                                 "--text-encoder openclip:MODEL:/path/to/CHECKPOINT") from error
            raise
        if got != (name, dim):
            raise InputError(f"text encoder {spec!r} is {got[0]} ({got[1]}-d) but the store's captions use "
                             f"{name} ({dim}-d)")
        return spec, name
    if (text_encoder.name, text_encoder.dim) != (name, dim):
        raise InputError(f"text encoder {text_encoder.name} ({text_encoder.dim}-d) does not match the "
                         f"store's {name} ({dim}-d)")
    return text_encoder, name


def _check_names_store(scenes: dict, store_ids: list[str], path: Path) -> None:
    if not set(scenes) & set(store_ids):
        example = next(iter(scenes), None)
        raise InputError(f"{path}: names none of the store's {len(store_ids)} scenes "
                         f"(file has {len(scenes)} scenes, e.g. {example!r})")


def import_captions(store_path: str | Path, fmt: str, captions_json: str | Path, index_pickle: str | Path,
                    text_encoder: Any = None, lock_wait_s: float = 0.0) -> ImportSummary:
    """Write the region captions of a PLA / RegionPLC JSON + index-pickle pair into a store.

    ``fmt`` is ``regionplc`` or ``pla`` (view or entity files). Caption and index keys are paired by
    name in the pickle's order; unpaired keys, empty sets and blank captions are counted and
    skipped. Every index must be a row of the scene's ``points/*`` (InputError otherwise). A key
    naming a frame (``"<frame>_<k>"``, a PLA view key) ties the region to that frame when the store
    kept it. Phrases are embedded with the store's text encoder (``text_encoder``: a spec or an
    encoder object with the same name/dim, for stores whose encoder needs a checkpoint path).
    Every scene is checked before any is written. The writes hold the store's writer lock (as a
    preprocessing run does); another run's lock is waited for up to ``lock_wait_s`` seconds, then
    an InputError names its owner.
    """

    if fmt not in FORMATS:
        raise InputError(f"unknown caption format {fmt!r} (expected {' or '.join(FORMATS)})")
    store = open_store(store_path, mode="r+")
    with store_lock(store.path, "import-captions", wait_s=lock_wait_s):
        return _import_captions(store, fmt, Path(captions_json), Path(index_pickle), text_encoder)


def _import_captions(store: Store, fmt: str, captions_json: Path, index_pickle: Path,
                     text_encoder: Any) -> ImportSummary:
    store_ids = store.scene_ids()
    if not store_ids:
        raise InputError(f"{store.path}: the store has no complete scene")
    encoder, encoder_name = _resolve_encoder(store, text_encoder)
    captions = load_caption_json(captions_json)
    _check_names_store(captions, store_ids, captions_json)
    index = safe_load_index_pickle(index_pickle)
    _check_names_store(index, store_ids, index_pickle)

    summary = ImportSummary(as_path(store.path), fmt, captions_json, index_pickle, encoder_name,
                            not_in_store=sorted((set(captions) | set(index)) - set(store_ids)))
    plans: dict[str, tuple[list[str], list[np.ndarray], list[int]]] = {}
    for scene_id in store_ids:
        caps, infos = captions.get(scene_id), index.get(scene_id)
        if caps is None or infos is None:
            status = "missing" if caps is None and infos is None else \
                "no-index" if infos is None else "no-captions"
            summary.scenes.append(SceneImport(scene_id, status, no_index=len(caps or {}),
                                              no_caption=len(infos or {})))
            continue
        scene = store.scene(scene_id)
        num_points = scene.num_points
        rows = {int(f): i for i, f in enumerate(scene["frames/index"][:])} if "frames/index" in scene else {}
        row = SceneImport(scene_id, "imported", no_index=sum(k not in infos for k in caps))
        texts, sets, frames = [], [], []
        for name, points in infos.items():  # the pickle's order, as in training
            if name not in caps:
                row.no_caption += 1
                continue
            if points.size == 0:
                row.empty += 1
                continue
            lo, hi = int(points.min()), int(points.max())
            if lo < 0 or hi >= num_points:
                bad = lo if lo < 0 else hi
                raise InputError(f"{index_pickle}: scene {scene_id!r} key {name!r}: point index {bad} out of "
                                 f"range 0..{num_points - 1} (indices must point into the scene's original "
                                 "points)")
            if not caps[name].strip():
                row.blank += 1
                continue
            frame = _key_frame(fmt, name)
            texts.append(caps[name])
            sets.append(points)
            frames.append(rows.get(frame, -1) if frame is not None else -1)
        row.regions = len(texts)
        row.with_frame = sum(f >= 0 for f in frames)
        summary.scenes.append(row)
        plans[scene_id] = (texts, sets, frames)

    if plans and isinstance(encoder, str):
        encoder = build_text_encoder(encoder)
    source = {"format": fmt, "captions": captions_json.name, "index": index_pickle.name}
    for scene_id, (texts, sets, frames) in plans.items():
        clip = embed_captions(texts, encoder) if texts else np.zeros((0, store.attrs["text_dim"]), np.float16)
        regions = RegionCaptions.from_sets(texts, sets, clip, frame=np.asarray(frames, np.int32))
        store.add_region_captions(scene_id, regions, source)
    return summary


# ---------------------------------------------------------------------------------------------
# Export in the released formats


def _scenes_with_regions(store: Store) -> list[str]:
    ids = [s for s in store.scene_ids() if store.scene(s).has_region_captions]
    if not ids:
        raise InputError(f"{store.path}: no scene of the store has region captions")
    return ids


def write_regionplc_files(store_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the store's region captions as a RegionPLC caption JSON + list-form index pickle.

    Keys: ``"<frame:06d>_<k>"`` (``<frame>`` = the ``frames/index`` value, ``k`` counts the regions
    of that frame) for frame-tied regions, ``"app_0_<n>"`` for the others. The pickle lists the
    scenes that have region captions in sorted order: ``infos`` int32 arrays and ``boxes`` per frame
    as float32 [y_min, x_min, y_max, x_max] in stored-frame pixels (NaN rows for point-set regions).
    Returns (json path, pickle path).
    """
    store = open_store(store_path)
    captions: dict[str, dict[str, str]] = {}
    records = []
    for scene_id in _scenes_with_regions(store):
        scene = store.scene(scene_id)
        regions = scene.region_captions()
        frame_numbers = scene["frames/index"][:] if "frames/index" in scene else np.zeros(0, np.int32)
        caps: dict[str, str] = {}
        infos: dict[str, np.ndarray] = {}
        boxes: dict[str, list[list[float]]] = {}
        others = 0
        for i in range(len(regions)):
            row = int(regions.frame[i])
            if row >= 0:
                stem = f"{int(frame_numbers[row]):06d}"
                frame_boxes = boxes.setdefault(stem, [])
                key = f"{stem}_{len(frame_boxes)}"
                x_min, y_min, x_max, y_max = (float(v) for v in regions.box[i])
                frame_boxes.append([y_min, x_min, y_max, x_max])
            else:
                key, others = f"app_0_{others}", others + 1
            caps[key] = regions.text[i]
            infos[key] = regions.points_of(i).astype(np.int32)
        captions[scene_id] = caps
        boxes_np = {stem: np.asarray(b, np.float32).reshape(-1, 4) for stem, b in boxes.items()}
        records.append({"scene_name": scene_id, "infos": infos, "boxes": boxes_np})
    dataset = store.attrs.get("dataset", "scenes")
    return _write_pair(Path(out_dir), f"caption_regions_{dataset}.json", captions,
                       f"{dataset}_caption_idx_regions.pkl", records)


def _write_pair(out_dir: Path, json_name: str, captions: Any, pickle_name: str, index: Any
                ) -> tuple[Path, Path]:
    """Write a caption JSON and its index pickle into ``out_dir``; -> their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, pkl_path = out_dir / json_name, out_dir / pickle_name
    json_path.write_text(json.dumps(captions, indent=1), encoding="utf-8")
    with pkl_path.open("wb") as f:
        pickle.dump(index, f)
    return json_path, pkl_path


def write_pla_files(store_path: str | Path, out_dir: str | Path, level: str = "entity") -> tuple[Path, Path]:
    """Write the store's region captions as a PLA caption JSON + dict-form pickle of torch.IntTensor.

    ``level="entity"``: keys ``"entity_<k>"``. ``level="view"``: keys ``"<frame:06d>"``; every region
    must be tied to a frame, one per frame (InputError otherwise). Returns (json path, pickle path).
    """
    import torch  # heavy: only for files that hold torch tensors

    if level not in PLA_LEVELS:
        raise InputError(f"unknown PLA caption level {level!r} (expected view or entity)")
    store = open_store(store_path)
    captions: dict[str, dict[str, str]] = {}
    index: dict[str, dict[str, Any]] = {}
    for scene_id in _scenes_with_regions(store):
        scene = store.scene(scene_id)
        regions = scene.region_captions()
        frame_numbers = scene["frames/index"][:] if "frames/index" in scene else np.zeros(0, np.int32)
        caps: dict[str, str] = {}
        infos: dict[str, Any] = {}
        for i in range(len(regions)):
            if level == "entity":
                key = f"entity_{i}"
            else:
                row = int(regions.frame[i])
                if row < 0:
                    raise InputError(f"{store.path}: scene {scene_id} region {i} is not tied to a frame; "
                                     "write it as level 'entity'")
                key = f"{int(frame_numbers[row]):06d}"
                if key in caps:
                    raise InputError(f"{store.path}: scene {scene_id} has several regions in frame {key}; "
                                     "a PLA view file holds one caption per frame (use level 'entity')")
            caps[key] = regions.text[i]
            infos[key] = torch.from_numpy(regions.points_of(i).astype(np.int32))  # an IntTensor
        captions[scene_id] = caps
        index[scene_id] = infos
    dataset = store.attrs.get("dataset", "scenes")
    return _write_pair(Path(out_dir), f"caption_{level}_{dataset}.json", captions,
                       f"{dataset}_{level}_matching_idx.pickle", index)
