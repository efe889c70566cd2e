"""Download the official ScanNet v2 files needed by the pipeline (resumable, parallel).

ScanNet is distributed under its terms of use: each user gets their own download URL, which we
take from ``--url`` / ``XMASK3D_SCANNET_URL`` and never hard-code. Expected layout under that
URL (the same relative layout as the raw directory, so a local mirror directory works alike)::

    <url>/scannetv2-labels.combined.tsv
    <url>/scans/<scene>/<scene>.sens
    <url>/scans/<scene>/<scene>_vh_clean_2.ply
    <url>/scans/<scene>/<scene>_vh_clean_2.labels.ply
    <url>/scans/<scene>/<scene>_vh_clean_2.0.010000.segs.json
    <url>/scans/<scene>/<scene>.aggregation.json
    <url>/scans/<scene>/<scene>.txt
    <url>/scans/<scene>/<scene>_2d-label-filt.zip      2D label images (label-filt/<frame>.png)
    <url>/scans_test/<scene>/<scene>.sens, _vh_clean_2.ply, .txt   test scenes (no annotations)

The split lists are optional on the server: when it hosts ``scannetv2_{train,val,test}.txt`` they
are downloaded and used (as in the raw directory, where they win), otherwise the official lists
shipped with the package choose the scenes of ``--split`` (``preprocessing.scannet.splits``).

The URL holds a personal token: messages show only its scheme and host (``storage.redact``), and
the Prefect flow reads it from the environment or a Secret block, never from a parameter.
Every file is verified before it takes its final name (type, size, checksum when known:
``preprocessing.download``); ``verify=True`` re-checks the files already on disk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from preprocessing.download import RetryPolicy, check_source, fetch, fetch_all
from preprocessing.scannet.splits import SCENE_ID, SPLIT_FILES, split_lists
from preprocessing.verify import read_checksum_file
from storage.errors import InputError

log = logging.getLogger(__name__)

URL_ENV = "XMASK3D_SCANNET_URL"
LABEL_TSV = "scannetv2-labels.combined.tsv"
LABEL_ZIP_SUFFIX = "_2d-label-filt.zip"
TOP_FILES = (LABEL_TSV,)
SCENE_SUFFIXES = (
    ".sens",
    "_vh_clean_2.ply",
    "_vh_clean_2.labels.ply",
    "_vh_clean_2.0.010000.segs.json",
    ".aggregation.json",
    ".txt",
    LABEL_ZIP_SUFFIX,
)
TEST_SCENE_SUFFIXES = (".sens", "_vh_clean_2.ply", ".txt")  # scans_test/: no annotations


def scene_files(scene_id: str, split: str | None = None) -> list[str]:
    """Relative paths of one scene's files (``scans_test/`` and no annotations for the test split)."""
    if split == "test":
        return [f"scans_test/{scene_id}/{scene_id}{suffix}" for suffix in TEST_SCENE_SUFFIXES]
    return [f"scans/{scene_id}/{scene_id}{suffix}" for suffix in SCENE_SUFFIXES]


def _fetch_if_hosted(base: str | Path, relative: str, out_dir: Path, policy: RetryPolicy) -> Path | None:
    """Fetch an optional file; None when the source does not have it (HTTP 404 / not in the mirror)."""
    try:
        return fetch(base, relative, out_dir, policy)
    except InputError as error:
        if "HTTP 404" in str(error) or "not found in the mirror" in str(error):
            return None
        raise


def download_scannet(out_dir: Path, url: str | None = None, mirror: Path | None = None,
                     scenes: list[str] | None = None, split: str | None = None, workers: int = 4,
                     policy: RetryPolicy = RetryPolicy(), checksums: Path | None = None,
                     verify: bool = False) -> list[Path]:
    """Download the label TSV, the split lists the server hosts and the per-scene files into ``out_dir``.

    Scenes: ``scenes`` if given, else the ``split`` list (``train``/``val``/``test``), else train
    and val; those lists come from the server when it hosts them, else the packaged official ones
    (given scenes are placed under scans/ or scans_test/ by the lists in ``out_dir`` or the packaged ones).
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
    hosted: list[Path] = []
    if scenes is None:  # the scenes of a split: the server's lists when it hosts them
        hosted = [p for name in SPLIT_FILES.values() if (p := _fetch_if_hosted(base, name, out_dir, policy))]
    scene_split, sources = split_lists(out_dir)
    if scenes is None:
        log.info("split lists: %s", ", ".join(f"{k} from {v}" for k, v in sources.items()))
        wanted = [split] if split else ["train", "val"]
        scenes = [s for s, k in scene_split.items() if k in wanted]
    relatives = [rel for scene in scenes for rel in scene_files(scene, scene_split.get(scene))]
    return top + hosted + fetch_all(base, relatives, out_dir, workers=workers, policy=policy, desc="scannet",
                                    checksums=sums, verify=verify)
