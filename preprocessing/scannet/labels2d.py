"""ScanNet 2D label images: ``<scene>_2d-label-filt.zip`` -> NYU40 / raw-category label images.

The release's ``<scene>_2d-label-filt.zip`` holds one 16-bit greyscale PNG per ``.sens`` frame,
``label-filt/<frame number>.png``, at the colour size, whose values are ScanNet label ids (the
``id`` column of ``scannetv2-labels.combined.tsv``, 0 = unannotated) - the same ids the project
keeps per point in ``points/category``. ``nyu40id`` of the same TSV maps them to NYU40 (ScanNet's
``convert_scannet_label_image.py`` does the same), as ``points/nyu40`` holds per point. Images
are resized to the stored frame size with nearest neighbour (pixel centres, like the depth).
"""

from __future__ import annotations

import csv
import functools
import io
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from preprocessing.scannet.mesh import label_tsv_version
from preprocessing.scannet.sens import nearest_indices
from storage.errors import InputError

LABEL_ZIP_SUFFIX = "_2d-label-filt.zip"
MEMBER = re.compile(r"label-filt/(\d+)\.png")


def label_zip_path(scene_dir: Path) -> Path:
    """``<scene_dir>/<scene>_2d-label-filt.zip``."""
    return Path(scene_dir) / f"{Path(scene_dir).name}{LABEL_ZIP_SUFFIX}"


@functools.lru_cache(maxsize=4)
def _nyu40_table(path: str, mtime_ns: int) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: label TSV not found") from error
    if not rows or not {"id", "nyu40id"} <= set(rows[0]):
        raise InputError(f"{path}: not a ScanNet label TSV (needs columns id and nyu40id)")
    pairs = []
    for number, row in enumerate(rows, start=2):
        try:
            raw_id, nyu40 = int(row["id"]), int(row["nyu40id"] or 0)
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: line {number}: invalid id/nyu40id {row.get('id')!r}/"
                             f"{row.get('nyu40id')!r}") from error
        if not (0 < raw_id < 65536 and 0 <= nyu40 <= 40):
            raise InputError(f"{path}: line {number}: id {raw_id} / nyu40id {nyu40} out of range")
        pairs.append((raw_id, nyu40))
    table = np.full(65536, -1, np.int16)  # raw id -> nyu40 id; -1 = not in the TSV
    table[0] = 0
    for raw_id, nyu40 in pairs:
        table[raw_id] = nyu40
    return table


def nyu40_table(tsv: Path) -> np.ndarray:
    """int16[65536]: ScanNet label id -> NYU40 id (0 -> 0; -1 for ids the TSV does not have)."""
    return _nyu40_table(str(tsv), label_tsv_version(tsv))


class LabelImages:
    """The label images of one scene's zip, read frame by frame (the zip stays open; use ``with``)."""

    def __init__(self, path: Path, tsv: Path) -> None:
        self.path = Path(path)
        self.table = nyu40_table(tsv)
        self.tsv = Path(tsv)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except FileNotFoundError as error:
            raise InputError(f"{self.path}: file not found") from error
        except (zipfile.BadZipFile, OSError) as error:
            raise InputError(f"{self.path}: not a zip file ({error})") from error
        self.members = {int(m.group(1)): name for name in self.zip.namelist()
                        if (m := MEMBER.fullmatch(name))}
        if not self.members:
            raise InputError(f"{self.path}: no label-filt/<frame>.png entries")

    def __enter__(self) -> LabelImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    def raw(self, frame: int) -> np.ndarray:
        """uint16 [H,W] ScanNet label ids of ``.sens`` frame ``frame`` at the zip's size."""
        name = self.members.get(frame)
        if name is None:
            raise InputError(f"{self.path}: no label image for frame {frame} (label-filt/{frame}.png)")
        try:
            with Image.open(io.BytesIO(self.zip.read(name))) as image:
                if image.mode not in ("I;16", "I;16B", "I", "L"):
                    raise InputError(f"{self.path}: {name} is a {image.mode} image, "
                                     "expected 16-bit greyscale")
                label = np.asarray(image)
        except (OSError, SyntaxError, zipfile.BadZipFile) as error:
            raise InputError(f"{self.path}: {name}: corrupt PNG ({error})") from error
        if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 65535:
            raise InputError(f"{self.path}: {name}: not a 16-bit label image")
        return label.astype(np.uint16)

    def frame(self, frame: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(nyu40 uint8 [H,W], category uint16 [H,W]) of ``frame`` resized (nearest) to ``size`` (W, H)."""
        raw = self.raw(frame)
        W, H = size
        category = raw[nearest_indices(raw.shape[0], H)[:, None], nearest_indices(raw.shape[1], W)[None, :]]
        nyu40 = self.table[category]
        if (nyu40 < 0).any():
            unknown = np.unique(category[nyu40 < 0])
            raise InputError(f"{self.path}: label-filt/{frame}.png has label ids {unknown[:5].tolist()} "
                             f"not in {self.tsv}")
        return nyu40.astype(np.uint8), category
