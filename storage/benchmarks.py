"""Open-vocabulary benchmarks (7 real, 1 synthetic): class lists, base/novel splits, label maps, recipe.

Class lists and splits come from the packaged ``data/benchmarks.json`` (the official PLA/XMask3D
configs). One preprocessed store serves every benchmark: labels are mapped at read time with
vectorised lookup tables, raw id -> 0..T-1 with 255 = ignore. This module imports only numpy and
its packaged JSON, because both the data path and the model rely on it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import numpy as np

from storage.errors import InputError

IGNORE = 255

BENCHMARK_NAMES: tuple[str, ...] = (
    "scannet20-b15n4",
    "scannet20-b12n7",
    "scannet20-b10n9",
    "scannet200-b170n30",
    "scannet200-b150n50",
    "s3dis-b8n4",
    "s3dis-b6n6",
)
# Benchmarks on the synthetic generator's scenes (docs/openvocab.md): same label maps and store
# fields as the real ones, novel classes chosen so that they occur in the synthetic training and
# held-out scenes. Kept apart from BENCHMARK_NAMES (the paper's benchmarks, one deployment each).
# They are defined here, not in data/benchmarks.json (which mirrors the official definitions):
# name -> (the real benchmark whose classes and label map are reused, the novel classes).
SYNTHETIC_SPLITS: dict[str, tuple[str, tuple[str, ...]]] = {
    # ScanNet20 classes; the novel ones occur in 2-4 of the first 6 synthetic scenes (the room
    # cycle) and in the held-out living room / bedroom scenes of an 8-scene set.
    "synthetic-b15n4": ("scannet20-b15n4", ("cabinet", "table", "bookshelf", "sink")),
}
SYNTHETIC_BENCHMARK_NAMES: tuple[str, ...] = tuple(SYNTHETIC_SPLITS)

_STORE_FIELD = {
    "nyu40": "points/nyu40",
    "scannet_raw_category": "points/category",
    "s3dis_class_index": "points/label",
}


@dataclass(frozen=True)
class Recipe:
    """Per-benchmark loss/inference settings of the official configs (XMASK3D_SPEC.md §5)."""

    binary_weight: float
    binary_pos_weight: float
    contra_weight: float
    contra_start_epoch: int
    base_ratio: float
    novel_ratio: float


# Official values (XMASK3D_SPEC.md §5 table). The two S3DIS entries are NOT in the official
# configs: they are our choice, following the ScanNet20 recipe (binary weight 16,
# pos_weight = #novel / #base, mask regularisation 0.5 from epoch 50, novel_ratio 0.35).
RECIPES: dict[str, Recipe] = {
    "scannet20-b15n4": Recipe(16, 0.267, 0.5, 50, 0.65, 0.35),
    "scannet20-b12n7": Recipe(12, 0.583, 0.5, 50, 0.65, 0.35),
    "scannet20-b10n9": Recipe(8, 0.5, 1.0, 50, 0.65, 0.2),
    "scannet200-b170n30": Recipe(48, 0.1, 2.0, 75, 0.65, 0.25),
    "scannet200-b150n50": Recipe(32, 0.167, 2.0, 75, 0.65, 0.35),
    "s3dis-b8n4": Recipe(16, 4 / 8, 0.5, 50, 0.65, 0.35),  # our choice (not in the official configs)
    "s3dis-b6n6": Recipe(16, 6 / 6, 0.5, 50, 0.65, 0.35),  # our choice (not in the official configs)
    # Synthetic: the ScanNet20 B15N4 recipe (pos_weight = 4 / 15), same split sizes.
    "synthetic-b15n4": Recipe(16, 0.267, 0.5, 50, 0.65, 0.35),
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: T evaluated classes, C of them base, and the training recipe.

    Labels are indices into ``class_names`` (0..T-1), 255 = ignore. ``to_base`` compacts the base
    classes (in ``class_names`` order) to 0..C-1, as the official training targets do.
    """

    name: str
    dataset: Literal["scannet", "s3dis"]
    class_names: tuple[str, ...]
    source_ids: tuple[int, ...]
    source_id_kind: Literal["nyu40", "scannet_raw_category", "s3dis_class_index"]
    base: tuple[str, ...]
    novel: tuple[str, ...]
    binary_weight: float
    binary_pos_weight: float
    contra_weight: float
    contra_start_epoch: int
    base_ratio: float
    novel_ratio: float
    _luts: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.source_ids):
            raise InputError(f"benchmark {self.name}: {len(self.class_names)} classes but "
                             f"{len(self.source_ids)} source ids")
        unknown = (set(self.base) | set(self.novel)) - set(self.class_names)
        if unknown or set(self.base) & set(self.novel):
            raise InputError(f"benchmark {self.name}: base/novel split is inconsistent ({sorted(unknown)})")
        index = {c: i for i, c in enumerate(self.class_names)}
        raw = np.full(max(self.source_ids) + 1, IGNORE, dtype=np.uint8)
        raw[np.asarray(self.source_ids)] = np.arange(len(self.source_ids), dtype=np.uint8)
        base_idx = np.array(sorted(index[c] for c in self.base), dtype=np.int64)
        novel_idx = np.array(sorted(index[c] for c in self.novel), dtype=np.int64)
        to_base = np.full(256, IGNORE, dtype=np.uint8)
        to_base[base_idx] = np.arange(len(base_idx), dtype=np.uint8)
        to_binary = np.full(256, IGNORE, dtype=np.uint8)
        to_binary[base_idx] = 1
        to_binary[novel_idx] = 0
        for array in (raw, base_idx, novel_idx, to_base, to_binary):
            array.flags.writeable = False
        self._luts.update(raw=raw, base_idx=base_idx, novel_idx=novel_idx, to_base=to_base,
                          to_binary=to_binary)

    @property
    def num_classes(self) -> int:
        """T: number of evaluated classes."""
        return len(self.class_names)

    @property
    def base_indices(self) -> np.ndarray:
        """int64[C]: indices of the base classes in ``class_names`` (ascending)."""
        return self._luts["base_idx"]

    @property
    def novel_indices(self) -> np.ndarray:
        """int64[T-C]: indices of the novel classes in ``class_names`` (ascending)."""
        return self._luts["novel_idx"]

    @property
    def store_field(self) -> str:
        """The store array that holds this benchmark's raw ids."""
        return _STORE_FIELD[self.source_id_kind]

    def map_raw(self, raw_ids: np.ndarray) -> np.ndarray:
        """Raw ids (NYU40 / ScanNet raw category / S3DIS class index) -> uint8 0..T-1, 255 = ignore."""
        raw_ids = np.asarray(raw_ids)
        lut = self._luts["raw"]
        if raw_ids.dtype.kind not in "iu":
            raise InputError(f"benchmark {self.name}: raw ids must be integers, got {raw_ids.dtype}")
        valid = (raw_ids >= 0) & (raw_ids < len(lut))
        return np.where(valid, lut[np.where(valid, raw_ids, 0)], np.uint8(IGNORE)).astype(np.uint8)

    def to_base(self, labels: np.ndarray) -> np.ndarray:
        """Labels 0..T-1/255 -> compact base labels 0..C-1; novel and ignore -> 255."""
        return self._luts["to_base"][np.asarray(labels, dtype=np.uint8)]

    def to_binary(self, labels: np.ndarray) -> np.ndarray:
        """Labels 0..T-1/255 -> 1 for base, 0 for novel, 255 for ignore."""
        return self._luts["to_binary"][np.asarray(labels, dtype=np.uint8)]


@functools.cache
def _load_json() -> dict:
    text = resources.files("storage").joinpath("data/benchmarks.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (BENCHMARK_NAMES or SYNTHETIC_BENCHMARK_NAMES); InputError otherwise."""
    if name not in BENCHMARK_NAMES + SYNTHETIC_BENCHMARK_NAMES:
        choices = ", ".join(BENCHMARK_NAMES + SYNTHETIC_BENCHMARK_NAMES)
        raise InputError(f"unknown benchmark {name!r}; choose one of {choices}")
    if name in SYNTHETIC_SPLITS:
        source, novel = SYNTHETIC_SPLITS[name]
        entry = dict(_load_json()[source], novel=list(novel))
        entry["base"] = [c for c in entry["class_names"] if c not in novel]
    else:
        entry = _load_json()[name]
    recipe = RECIPES[name]
    return Benchmark(
        name=name,
        dataset=entry["dataset"],
        class_names=tuple(entry["class_names"]),
        source_ids=tuple(int(i) for i in entry["source_ids"]),
        source_id_kind=entry["source_id_kind"],
        base=tuple(entry["base"]),
        novel=tuple(entry["novel"]),
        binary_weight=float(recipe.binary_weight),
        binary_pos_weight=float(recipe.binary_pos_weight),
        contra_weight=float(recipe.contra_weight),
        contra_start_epoch=int(recipe.contra_start_epoch),
        base_ratio=float(recipe.base_ratio),
        novel_ratio=float(recipe.novel_ratio),
    )
