"""Resumable downloads against a real local HTTP server (preprocessing/download.py, scannet/download.py)."""


import numpy as np
import pytest

from preprocessing.download import RetryPolicy, fetch, fetch_all
from preprocessing.scannet.download import TOP_FILES, download_scannet, scene_files
from storage.errors import InputError
from tests.http_server import serve_directory
from tests.servers import free_port

FAST = RetryPolicy(retries=3, backoff_s=0.01, timeout_s=5)
SCENES = ["scene0000_00", "scene0001_00"]
HOSTED_LISTS = ["scannetv2_train.txt", "scannetv2_val.txt"]  # the tree hosts these two (no test list)


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    """A raw ScanNet-like tree with random bytes (download is content-agnostic)."""
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    (root / "scannetv2-labels.combined.tsv").write_bytes(rng.bytes(3000))
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0001_00\n")
    for scene in SCENES:
        for rel in scene_files(scene):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(rng.bytes(int(rng.integers(1, 300_000))))
    return root


def same_tree(a, b, rels):
    return all((a / r).read_bytes() == (b / r).read_bytes() for r in rels)


def test_download_resumes_after_dropped_connections(raw_tree, tmp_path):
    log = []
    with serve_directory(raw_tree, drop_once=True, log=log) as url:
        paths = download_scannet(tmp_path, url=url, workers=3, policy=FAST)
    rels = list(TOP_FILES) + HOSTED_LISTS + [r for s in SCENES for r in scene_files(s)]
    assert paths == [tmp_path / r for r in rels]
    assert same_tree(raw_tree, tmp_path, rels)
    assert not list(tmp_path.rglob("*.part"))
    sens = "scans/scene0000_00/scene0000_00.sens"
    requests = [h for p, h in log if p == sens]
    size = (raw_tree / sens).stat().st_size
    assert requests == [None, f"bytes={size // 2}-"]  # resumed where the connection dropped


def test_complete_files_are_skipped(raw_tree, tmp_path):
    with serve_directory(raw_tree) as url:
        download_scannet(tmp_path, url=url, scenes=["scene0001_00"], policy=FAST)
        log = []
        with serve_directory(raw_tree, log=log) as url2:
            download_scannet(tmp_path, url=url2, scenes=["scene0001_00"], policy=FAST)
    assert log == []


def test_existing_part_file_is_resumed(raw_tree, tmp_path):
    rel = "scans/scene0000_00/scene0000_00.sens"
    data = (raw_tree / rel).read_bytes()
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / (rel + ".part")).write_bytes(data[:1000])
    log = []
    with serve_directory(raw_tree, log=log) as url:
        fetch(url, rel, tmp_path, FAST)
    assert (tmp_path / rel).read_bytes() == data
    assert log == [(rel, "bytes=1000-")]


def test_split_selection_and_env_url(raw_tree, tmp_path, monkeypatch):
    with serve_directory(raw_tree) as url:
        monkeypatch.setenv("XMASK3D_SCANNET_URL", url)
        download_scannet(tmp_path, split="val", policy=FAST)
    assert (tmp_path / "scans/scene0001_00/scene0001_00.sens").is_file()
    assert not (tmp_path / "scans/scene0000_00").exists()


def test_mirror_directory_behaves_like_url(raw_tree, tmp_path):
    paths = download_scannet(tmp_path, mirror=raw_tree, scenes=["scene0000_00"])
    rels = list(TOP_FILES) + scene_files("scene0000_00")  # scenes given: no split list needed
    assert paths == [tmp_path / r for r in rels] and same_tree(raw_tree, tmp_path, rels)
    with pytest.raises(InputError, match="scene0009_00.sens: not found in the mirror"):
        download_scannet(tmp_path / "other", mirror=raw_tree, scenes=["scene0009_00"])


@pytest.mark.parametrize("code", [403, 404])
def test_client_errors_name_the_url_and_leave_nothing(raw_tree, tmp_path, code):
    rel = "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
    with serve_directory(raw_tree, status={rel: code}) as url:
        with pytest.raises(InputError, match=rf"{url}/{rel}: HTTP {code}"):
            download_scannet(tmp_path, url=url, scenes=["scene0000_00"], workers=1, policy=FAST)
    assert not (tmp_path / rel).exists()


def test_missing_file_is_404(raw_tree, tmp_path):
    with serve_directory(raw_tree) as url:
        with pytest.raises(InputError, match=r"scans/scene0042_00/scene0042_00\S*: HTTP 404"):
            download_scannet(tmp_path, url=url, scenes=["scene0042_00"], policy=FAST)
    assert not list((tmp_path / "scans").rglob("*.sens"))


def test_size_mismatch_gives_up_and_keeps_no_final_file(raw_tree, tmp_path):
    rel = "scans/scene0000_00/scene0000_00.sens"
    with serve_directory(raw_tree, truncate={rel: 500}) as url:
        with pytest.raises(InputError, match=r"scene0000_00\.sens: size mismatch, received 500 bytes"):
            fetch(url, rel, tmp_path, FAST)
    assert not (tmp_path / rel).exists()


def test_bad_urls(tmp_path):
    port = free_port()  # nobody listens there
    with pytest.raises(InputError, match=f"127.0.0.1:{port}/a.bin.*gave up after 2 attempts"):
        fetch(f"http://127.0.0.1:{port}", "a.bin", tmp_path, RetryPolicy(retries=1, backoff_s=0.01))
    assert not (tmp_path / "a.bin").exists()
    with pytest.raises(InputError, match="unsupported URL scheme 'ftp'"):
        fetch_all("ftp://example.org/scannet", ["a.bin"], tmp_path)
    with pytest.raises(InputError, match="exactly one of --url"):
        download_scannet(tmp_path, url="http://127.0.0.1:1", mirror=tmp_path)
    with pytest.raises(InputError, match="not a ScanNet scene id: 'scene1'"):
        download_scannet(tmp_path, mirror=tmp_path, scenes=["scene1"])


def test_cli_download(raw_tree, tmp_path):
    from typer.testing import CliRunner

    from xmask3d.cli import app

    with serve_directory(raw_tree) as url:
        result = CliRunner().invoke(app, ["download", "scannet", "--out", str(tmp_path), "--url", url,
                                          "--scenes", "scene0001_00"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "scans/scene0001_00/scene0001_00.txt").is_file()
        bad = CliRunner().invoke(app, ["download", "scannet", "--out", str(tmp_path / "x"), "--url", url,
                                       "--scenes", "scene0077_00"])
    assert bad.exit_code == 2 and "scene0077_00" in bad.output and "HTTP 404" in bad.output


def test_synthetic_dataset_downloads_byte_identical(synthetic_scannet, tmp_path):
    log = []
    with serve_directory(synthetic_scannet, drop_once=True, log=log) as url:
        paths = download_scannet(tmp_path, url=url, workers=2, policy=FAST)
    served = sorted(p.relative_to(synthetic_scannet).as_posix() for p in synthetic_scannet.rglob("*")
                    if p.is_file() and p.name not in ("captions.json", "region_captions.json"))
    got = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert got == served
    assert same_tree(synthetic_scannet, tmp_path, served)
    assert sum(1 for _, r in log if r) == len(served)  # every file was cut once and resumed
