"""Download the official ScanNet v2 files needed by the pipeline (resumable, parallel).

ScanNet is distributed under its terms of use: each user gets their own download URL, which we
take from ``--url`` / ``XMASK3D_SCANNET_URL`` and never hard-code. Expected layout under that
URL (the same relative layout as the raw directory, so a local mirror directory works alike)::

    <url>/scannetv2-labels.combined.tsv
    <url>/scannetv2_train.txt
    <url>/scannetv2_val.txt
    <url>/scans/<scene>/<scene>.sens
    <url>/scans/<scene>/<scene>_vh_clean_2.ply
    <url>/scans/<scene>/<scene>_vh_clean_2.labels.ply
    <url>/scans/<scene>/<scene>_vh_clean_2.0.010000.segs.json
    <url>/scans/<scene>/<scene>.aggregation.json
    <url>/scans/<scene>/<scene>.txt

The URL holds a personal token: messages show only its scheme and host (``storage.redact``), and
the Prefect flow reads it from the environment or a Secret block, never from a parameter.
Every file is verified before it takes its final name (type, size, checksum when known:
``preprocessing.download``); ``verify=True`` re-checks the files already on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from preprocessing.download import RetryPolicy, check_source, fetch, fetch_all
from preprocessing.verify import read_checksum_file
from storage.errors import InputError

URL_ENV = "XMASK3D_SCANNET_URL"
LABEL_TSV = "scannetv2-labels.combined.tsv"
SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt"}
TOP_FILES = (LABEL_TSV, *SPLIT_FILES.values())
SCENE_SUFFIXES = (
    ".sens",
    "_vh_clean_2.ply",
    "_vh_clean_2.labels.ply",
    "_vh_clean_2.0.010000.segs.json",
    ".aggregation.json",
    ".txt",
)
SCENE_ID = re.compile(r"scene\d{4}_\d{2}")


def scene_files(scene_id: str) -> list[str]:
    """Relative paths of one scene's files."""
    return [f"scans/{scene_id}/{scene_id}{suffix}" for suffix in SCENE_SUFFIXES]


def read_split(path: Path) -> list[str]:
    """Scene ids listed in a split file (one per line)."""
    ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [i for i in ids if not SCENE_ID.fullmatch(i)]
    if bad:
        raise InputError(f"{path}: not a scene id: {bad[0]!r}")
    return ids


def download_scannet(out_dir: Path, url: str | None = None, mirror: Path | None = None,
                     scenes: list[str] | None = None, split: str | None = None, workers: int = 4,
                     policy: RetryPolicy = RetryPolicy(), checksums: Path | None = None,
                     verify: bool = False) -> list[Path]:
    """Download the label TSV, split lists and the per-scene files into ``out_dir``.

    Scenes: ``scenes`` if given, else the ``split`` list (``train``/``val``), else both lists.
    Complete files are skipped, so a rerun resumes an interrupted download. ``checksums``: a
    ``sha256sum``-format file of relative paths; ``verify``: re-check files already on disk against
    the source (size, checksum) and fetch again those that fail. Returns every path.
    """
    if url is None and mirror is None:
        url = os.environ.get(URL_ENV) or None
    if (url is None) == (mirror is None):
        raise InputError(f"give exactly one of --url (or ${URL_ENV}) and --mirror")
    if split is not None and split not in SPLIT_FILES:
        raise InputError(f"split must be one of {', '.join(SPLIT_FILES)}, got {split!r}")
    if scenes is not None and split is not None:
        raise InputError("give either scenes or split, not both")
    bad = [s for s in scenes or [] if not SCENE_ID.fullmatch(s)]
    if bad:
        raise InputError(f"not a ScanNet scene id: {bad[0]!r} (expected e.g. scene0000_00)")
    base = check_source(url if url is not None else Path(mirror))
    out_dir = Path(out_dir)
    sums = read_checksum_file(checksums) if checksums is not None else None
    top = [fetch(base, name, out_dir, policy, checksums=sums, verify=verify) for name in TOP_FILES]
    if scenes is None:
        lists = [split] if split else list(SPLIT_FILES)
        scenes = [s for name in lists for s in read_split(out_dir / SPLIT_FILES[name])]
    relatives = [rel for scene in scenes for rel in scene_files(scene)]
    return top + fetch_all(base, relatives, out_dir, workers=workers, policy=policy, desc="scannet",
                           checksums=sums, verify=verify)
