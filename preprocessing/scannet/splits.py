"""ScanNet v2 splits: which scene of a raw tree is train, val or test.

The official split lists (``scannetv2_train.txt`` 1201 scenes, ``scannetv2_val.txt`` 312,
``scannetv2_test.txt`` 100) live in ScanNet's code repository, not in the data release, so a
downloaded ``scans/`` tree has none. The package ships them (``preprocessing/scannet/splits/``,
byte-identical to the lists Pointcept, PLA and mmdetection3d ship); a list of the same name in the
raw directory wins over the packaged one, so custom splits (and the synthetic data) keep working.
Scenes under ``scans_test/`` (the release's test scans, without annotations) are the test split.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from storage.errors import InputError

SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt", "test": "scannetv2_test.txt"}
SCENE_ID = re.compile(r"scene\d{4}_\d{2}")
SCANS = {"scans": ("train", "val"), "scans_test": ("test",)}  # raw sub-directory -> splits it may hold


def parse_split(text: str, source: str) -> list[str]:
    """Scene ids of a split list (one per line); InputError naming ``source`` on a bad line."""
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [i for i in ids if not SCENE_ID.fullmatch(i)]
    if bad:
        raise InputError(f"{source}: not a scene id: {bad[0]!r}")
    return ids


def read_split(path: Path) -> list[str]:
    """Scene ids listed in a split file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise InputError(f"{path}: split list not found") from error
    return parse_split(text, str(path))


def official_split(split: str) -> list[str]:
    """The packaged official list of ``split`` ('train', 'val' or 'test')."""
    if split not in SPLIT_FILES:
        raise InputError(f"split must be one of {', '.join(SPLIT_FILES)}, got {split!r}")
    text = resources.files("preprocessing.scannet").joinpath("splits", SPLIT_FILES[split]).read_text()
    return parse_split(text, f"packaged {SPLIT_FILES[split]}")


def split_lists(raw_dir: Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(scene -> split, split -> where its list came from): each list from ``raw_dir`` when it holds
    one, else the packaged official list. A scene in two lists is an InputError naming both."""
    scene_split: dict[str, str] = {}
    sources: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        local = Path(raw_dir) / name if raw_dir is not None else None
        if local is not None and local.is_file():
            ids, sources[split] = read_split(local), str(local)
        else:
            ids, sources[split] = official_split(split), f"packaged {name}"
        for sid in ids:
            other = scene_split.setdefault(sid, split)
            if other != split:
                raise InputError(f"{sources[split]}: scene {sid} is also in the {other} list "
                                 f"({sources[other]})")
    return scene_split, sources


def list_scenes(raw_dir: Path) -> dict[str, str]:
    """Scene id -> split for every scene directory under ``scans/`` and ``scans_test/``.

    A scene under ``scans/`` must be in the train or val list, one under ``scans_test/`` in the
    test list; otherwise an InputError names the scene directory and the lists searched.
    """
    raw_dir = Path(raw_dir)
    if not any((raw_dir / sub).is_dir() for sub in SCANS):
        raise InputError(f"{raw_dir / 'scans'}: not found (expected the raw ScanNet v2 layout)")
    scene_split, sources = split_lists(raw_dir)
    out: dict[str, str] = {}
    for sub, allowed in SCANS.items():
        if not (raw_dir / sub).is_dir():
            continue
        for path in sorted(p for p in (raw_dir / sub).iterdir() if p.is_dir() and not p.name.startswith(".")):
            split = scene_split.get(path.name)
            if split not in allowed:
                where = ", ".join(sources[s] for s in allowed)
                found = f"it is in the {split} list" if split else "it is in no split list"
                raise InputError(f"{path}: {found} ({where}); add it to a list in {raw_dir} or remove it")
            out[path.name] = split
    if not out:
        raise InputError(f"{raw_dir}: no scene directories under scans/ or scans_test/")
    return dict(sorted(out.items()))


def scene_dir(raw_dir: Path, scene_id: str, split: str) -> Path:
    """The raw directory of a scene: ``scans_test/<id>`` for the test split, else ``scans/<id>``."""
    return Path(raw_dir) / ("scans_test" if split == "test" else "scans") / scene_id
