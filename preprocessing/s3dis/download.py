"""Download S3DIS and its Stanford 2D-3D-S views from the user's own link (resumable), then unpack.

Both datasets are given out through a request form, so the base URL (or a local mirror
directory) is the user's: ``--url`` / ``XMASK3D_S3DIS_URL``, never hard-coded. Expected files
under it, as distributed::

    <url>/Stanford3dDataset_v1.2.zip                    the non-aligned point clouds (default)
    <url>/Stanford3dDataset_v1.2_Aligned_Version.zip    the aligned release (``release="aligned"``)
    <url>/area_1_no_xyz.tar ... area_6_no_xyz.tar       2D-3D-S views per area (area_5a, area_5b)

Archives are fetched by the shared resumable downloader (``preprocessing.download``: ``.part``
files, Range resume, atomic rename, retries), then unpacked into ``out_dir`` (the zip) and
``out_dir/Stanford2d3dDataset_noXYZ`` (the tars). A marker file ``.<archive>.unpacked`` is written
after an archive is completely unpacked, so a rerun skips finished downloads and archives and
redoes only the interrupted ones.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

from preprocessing.download import RetryPolicy, check_source, fetch_all
from preprocessing.verify import read_checksum_file
from storage.errors import InputError

URL_ENV = "XMASK3D_S3DIS_URL"
RELEASES = {"raw": "Stanford3dDataset_v1.2.zip", "aligned": "Stanford3dDataset_v1.2_Aligned_Version.zip"}
VIEW_AREAS = ("1", "2", "3", "4", "5a", "5b", "6")
VIEWS_DIR = "Stanford2d3dDataset_noXYZ"


def view_archive(area: str) -> str:
    return f"area_{area}_no_xyz.tar"


def _areas(areas: list[str] | None) -> list[str]:
    if areas is None:
        return list(VIEW_AREAS)
    names = [a.strip().lower().removeprefix("area_") for a in areas if a.strip()]
    bad = [a for a in names if a not in VIEW_AREAS]
    if bad:
        raise InputError(f"not a 2D-3D-S area: {bad[0]!r} (expected {', '.join(VIEW_AREAS)})")
    return names


def _marker(out_dir: Path, archive: str) -> Path:
    return out_dir / f".{archive}.unpacked"


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a zip or tar into ``dest`` (members may not leave it); InputError on a broken archive.

    A broken archive is deleted, so the next run downloads it again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
                zf.extractall(dest)  # zipfile drops absolute paths and '..'
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        os.remove(archive)
        raise InputError(f"{archive}: broken archive ({error}); deleted, run again to download it anew") \
            from error


def download_s3dis(out_dir: Path, url: str | None = None, mirror: Path | None = None,
                   release: str = "raw", views: bool = True, areas: list[str] | None = None,
                   workers: int = 2, keep_archives: bool = True,
                   policy: RetryPolicy = RetryPolicy(), checksums: Path | None = None,
                   verify: bool = False) -> list[Path]:
    """Fetch and unpack the S3DIS release and (``views``) the 2D-3D-S areas into ``out_dir``.

    ``release``: ``raw`` (non-aligned, the frame of the 2D-3D-S poses) or ``aligned``. ``areas``:
    2D-3D-S areas to fetch (``1``..``6``, ``5a``, ``5b``; default all). Returns the unpacked
    directories (``out_dir/Stanford3dDataset_v1.2[...]`` and ``out_dir/Stanford2d3dDataset_noXYZ``).
    ``checksums``: a ``sha256sum``-format file of the archive names; ``verify``: re-check the kept
    archives against the source (size, checksum), fetch again and unpack again those that fail.
    """
    if url is None and mirror is None:
        url = os.environ.get(URL_ENV) or None
    if (url is None) == (mirror is None):
        raise InputError(f"give exactly one of --url (or ${URL_ENV}) and --mirror")
    if release not in RELEASES:
        raise InputError(f"release must be one of {', '.join(RELEASES)}, got {release!r}")
    names = _areas(areas) if views else []
    base = check_source(url if url is not None else Path(mirror))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {RELEASES[release]: out_dir}
    targets.update({view_archive(a): out_dir / VIEWS_DIR for a in names})
    todo = [name for name in targets if not _marker(out_dir, name).is_file()]
    if verify:  # kept archives are checked again; one fetched anew is unpacked anew
        kept = [name for name in targets if name not in todo and (out_dir / name).is_file()]
        before = {name: _identity(out_dir / name) for name in kept}
        todo += kept
    sums = read_checksum_file(checksums) if checksums is not None else None
    fetch_all(base, todo, out_dir, workers=workers, policy=policy, desc="s3dis", checksums=sums,
              verify=verify)
    if verify:
        todo = [name for name in todo if name not in before or _identity(out_dir / name) != before[name]]
    for name in todo:
        unpack(out_dir / name, targets[name])
        _marker(out_dir, name).write_text("unpacked\n")
        if not keep_archives:
            os.remove(out_dir / name)
    release_dir = out_dir / Path(RELEASES[release]).stem
    if not release_dir.is_dir():
        raise InputError(f"{out_dir / RELEASES[release]}: did not unpack to {release_dir.name}/")
    return [release_dir] + ([out_dir / VIEWS_DIR] if names else [])
