"""S3DIS + 2D-3D-S download against a real local HTTP server: resume, unpack, skip, bad input."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preprocessing.download import RetryPolicy
from preprocessing.s3dis.download import RELEASES, VIEWS_DIR, download_s3dis, view_archive
from storage.errors import InputError
from tests.http_server import serve_directory

FAST = RetryPolicy(retries=3, backoff_s=0.01, timeout_s=5)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(synthetic raw S3DIS + views tree, a directory serving it as the distributed archives)."""
    from preprocessing.synthetic import write_s3dis

    tree = tmp_path_factory.mktemp("s3dis_tree")
    write_s3dis(tree, rooms=2, seed=0, progress=False, views=True, view_size=32)
    served = tmp_path_factory.mktemp("s3dis_served")
    with zipfile.ZipFile(served / RELEASES["raw"], "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((tree / "Stanford3dDataset_v1.2").rglob("*")):
            zf.write(path, path.relative_to(tree))
    for area in sorted((tree / VIEWS_DIR).glob("area_*")):
        with tarfile.open(served / view_archive(area.name.removeprefix("area_")), "w") as tf:
            tf.add(area, arcname=area.name)
    return tree, served


def test_download_resumes_and_unpacks(source, tmp_path):
    tree, served = source
    log: list = []
    with serve_directory(served, drop_once=True, log=log) as url:
        dirs = download_s3dis(tmp_path, url=url, areas=["1", "5b"], policy=FAST)
    assert dirs == [tmp_path / "Stanford3dDataset_v1.2", tmp_path / VIEWS_DIR]
    assert files_under(tmp_path / "Stanford3dDataset_v1.2") == files_under(tree / "Stanford3dDataset_v1.2")
    assert files_under(tmp_path / VIEWS_DIR / "area_1") == files_under(tree / VIEWS_DIR / "area_1")
    assert files_under(tmp_path / VIEWS_DIR / "area_5b") == files_under(tree / VIEWS_DIR / "area_5b")
    zip_requests = [h for p, h in log if p == RELEASES["raw"]]
    size = (served / RELEASES["raw"]).stat().st_size
    assert zip_requests == [None, f"bytes={size // 2}-"]  # resumed where the connection dropped
    assert not list(tmp_path.glob("*.part"))
    # a rerun downloads and unpacks nothing
    (tmp_path / "Stanford3dDataset_v1.2" / "Area_1" / "office_1" / "office_1.txt").unlink()
    again: list = []
    with serve_directory(served, log=again) as url:
        download_s3dis(tmp_path, url=url, areas=["1", "5b"], policy=FAST)
    assert again == []
    assert not (tmp_path / "Stanford3dDataset_v1.2" / "Area_1" / "office_1" / "office_1.txt").exists()


def test_interrupted_unpack_is_redone(source, tmp_path):
    tree, served = source
    download_s3dis(tmp_path, mirror=served, views=False)
    marker = tmp_path / f".{RELEASES['raw']}.unpacked"
    marker.unlink()  # as if the process died while unpacking
    room = tmp_path / "Stanford3dDataset_v1.2" / "Area_1" / "office_1" / "office_1.txt"
    room.write_text("partial")
    download_s3dis(tmp_path, mirror=served, views=False)
    assert room.read_bytes() == (tree / "Stanford3dDataset_v1.2" / "Area_1" / "office_1" / "office_1.txt"
                                 ).read_bytes()
    assert marker.is_file() and not (tmp_path / VIEWS_DIR).exists()


def test_broken_archive_is_reported_and_removed(source, tmp_path):
    _, served = source
    bad = tmp_path / "served"
    bad.mkdir()
    data = (served / RELEASES["raw"]).read_bytes()
    (bad / RELEASES["raw"]).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="broken archive"):
        download_s3dis(out, mirror=bad, views=False)
    assert not (out / RELEASES["raw"]).exists() and not (out / f".{RELEASES['raw']}.unpacked").exists()


def test_bad_arguments(source, tmp_path, monkeypatch):
    _, served = source
    monkeypatch.delenv("XMASK3D_S3DIS_URL", raising=False)
    with pytest.raises(InputError, match="exactly one"):
        download_s3dis(tmp_path, views=False)
    with pytest.raises(InputError, match="exactly one"):
        download_s3dis(tmp_path, url="http://127.0.0.1:9", mirror=served)
    with pytest.raises(InputError, match="not a 2D-3D-S area: '7'"):
        download_s3dis(tmp_path, mirror=served, areas=["1", "7"])
    with pytest.raises(InputError, match="release"):
        download_s3dis(tmp_path, mirror=served, release="rotated")
    with pytest.raises(InputError, match="mirror directory does not exist"):
        download_s3dis(tmp_path, mirror=tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_download_then_preprocess_paths(source, tmp_path, monkeypatch):
    from xmask3d.cli import app

    tree, served = source
    with serve_directory(served) as url:
        monkeypatch.setenv("XMASK3D_S3DIS_URL", url)
        result = CliRunner().invoke(app, ["download", "s3dis", "--out", str(tmp_path), "--areas", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / VIEWS_DIR / "area_1" / "data" / "pose").is_dir()
    assert not (tmp_path / VIEWS_DIR / "area_5b").exists()
    bad = CliRunner().invoke(app, ["download", "s3dis", "--out", str(tmp_path), "--mirror", str(served),
                                   "--areas", "9"])
    assert bad.exit_code == 2 and "not a 2D-3D-S area" in bad.output
