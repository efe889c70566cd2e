"""Resumable, verified downloads against a real local HTTP server (preprocessing/download.py,
scannet/download.py): resume, skip, HTML answers, checksums, ``verify``, refused connections, secrets."""

import hashlib
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from preprocessing.download import RetryPolicy, fetch, fetch_all
from preprocessing.scannet.download import TOP_FILES, download_scannet, scene_files
from storage.errors import InputError
from tests.http_server import HTML_PAGE, serve_directory, sha256_header
from tests.servers import free_port

FAST = RetryPolicy(retries=3, backoff_s=0.01, timeout_s=5)
SCENES = ["scene0000_00", "scene0001_00"]
HOSTED_LISTS = ["scannetv2_train.txt", "scannetv2_val.txt"]  # the tree hosts these two (no test list)


# the first bytes each file type must start with (the downloader checks them), then random bytes
HEADS = {".sens": struct.pack("<I", 4), ".ply": b"ply\nformat binary_little_endian 1.0\n", ".json": b"{",
         ".txt": b"axisAlignment = ", ".tsv": b"id\traw_category\n", ".zip": b"PK\x03\x04"}


def fake_file(rel: str, rng: np.random.Generator, size: int) -> bytes:
    return HEADS[Path(rel).suffix] + rng.bytes(size)


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    """A raw ScanNet-like tree: the right first bytes per file type, then random bytes."""
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    (root / "scannetv2-labels.combined.tsv").write_bytes(fake_file("labels.tsv", rng, 3000))
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0001_00\n")
    for scene in SCENES:
        for rel in scene_files(scene):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(fake_file(rel, rng, int(rng.integers(1, 300_000))))
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
    with pytest.raises(InputError, match=f"127.0.0.1:{port}/a.bin: connection refused \\(2 attempts\\); "
                                         "is the server running"):
        fetch(f"http://127.0.0.1:{port}", "a.bin", tmp_path, RetryPolicy(backoff_s=0.01, refused_retries=1))
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


# --- verification: web pages, checksums, files already on disk ----------------------------------

ONE = ["scene0001_00"]
ONE_RELS = list(TOP_FILES) + scene_files("scene0001_00")


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_web_page_answers_are_refused_and_a_good_server_then_fetches_everything(raw_tree, tmp_path,
                                                                                content_type):
    with serve_directory(raw_tree, html=True, html_type=content_type) as url:
        with pytest.raises(InputError, match=r"scannetv2-labels\.combined\.tsv: .*(web page|HTML)"):
            download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST)
        with pytest.raises(InputError, match=r"scene0001_00\.sens: .*(web page|HTML/XML page)"):
            fetch(url, "scans/scene0001_00/scene0001_00.sens", tmp_path, FAST)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # neither final files nor .part files
    log = []
    with serve_directory(raw_tree, log=log) as url:
        download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST)
    assert sorted(p for p, _ in log) == sorted(ONE_RELS)
    assert same_tree(raw_tree, tmp_path, ONE_RELS)


def test_web_pages_saved_by_an_older_version_are_fetched_again(raw_tree, tmp_path, caplog):
    for rel in ONE_RELS:  # what the size-only downloader kept from a login page
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(HTML_PAGE)
    log = []
    with caplog.at_level(logging.WARNING), serve_directory(raw_tree, log=log) as url:
        download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST)
    assert sorted(p for p, _ in log) == sorted(ONE_RELS)
    assert same_tree(raw_tree, tmp_path, ONE_RELS)
    assert "scene0001_00.sens: an HTML/XML page" in caplog.text and "fetching it again" in caplog.text


def test_published_checksum_is_checked(raw_tree, tmp_path):
    rel = "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
    data = (raw_tree / rel).read_bytes()
    wrong = sha256_header(data[:-1] + bytes([data[-1] ^ 1]))  # one bit off
    with serve_directory(raw_tree, headers={rel: wrong}) as url:
        with pytest.raises(InputError, match=r"scene0000_00_vh_clean_2\.ply: sha256 checksum mismatch"):
            fetch(url, rel, tmp_path, FAST)
    assert not (tmp_path / rel).exists() and not (tmp_path / (rel + ".part")).exists()
    # the published checksum also holds for a download resumed after a dropped connection (206)
    with serve_directory(raw_tree, headers={rel: sha256_header(data)}, drop_once=True) as url:
        assert fetch(url, rel, tmp_path, FAST).read_bytes() == data


def test_checksum_file_is_checked(raw_tree, tmp_path):
    rel = "scans/scene0000_00/scene0000_00.sens"
    digest = hashlib.sha256((raw_tree / rel).read_bytes()).hexdigest()
    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{'0' * 64}  {rel}\n")
    good = tmp_path / "good.sha256"
    good.write_text(f"{digest}  {rel}\n")
    with pytest.raises(InputError, match=r"scene0000_00\.sens: sha256 checksum mismatch"):
        download_scannet(tmp_path / "a", mirror=raw_tree, scenes=["scene0000_00"], checksums=bad)
    assert not (tmp_path / "a" / rel).exists()
    download_scannet(tmp_path / "b", mirror=raw_tree, scenes=["scene0000_00"], checksums=good)
    assert (tmp_path / "b" / rel).read_bytes() == (raw_tree / rel).read_bytes()
    broken = tmp_path / "broken.sha256"
    broken.write_text("not a checksum line\n")
    with pytest.raises(InputError, match=r"broken\.sha256:1: not a"):
        download_scannet(tmp_path / "c", mirror=raw_tree, scenes=["scene0000_00"], checksums=broken)


def test_verify_rechecks_files_on_disk_and_fetches_only_the_bad_ones(raw_tree, tmp_path):
    with serve_directory(raw_tree) as url:
        download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST)
    short = "scans/scene0001_00/scene0001_00.sens"  # right type, but cut short
    (tmp_path / short).write_bytes((raw_tree / short).read_bytes()[:100])
    flipped = "scans/scene0001_00/scene0001_00_vh_clean_2.ply"  # right size, one byte changed
    data = bytearray((raw_tree / flipped).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / flipped).write_bytes(bytes(data))
    headers = {flipped: sha256_header((raw_tree / flipped).read_bytes())}
    log = []
    with serve_directory(raw_tree, log=log, headers=headers) as url:
        download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST)  # a plain rerun trusts the files
        assert log == []
        download_scannet(tmp_path, url=url, scenes=ONE, policy=FAST, verify=True)
    assert sorted(p for p, _ in log if not p.startswith("HEAD ")) == sorted([short, flipped])
    assert sorted(p.removeprefix("HEAD ") for p, _ in log if p.startswith("HEAD ")) == sorted(ONE_RELS)
    assert same_tree(raw_tree, tmp_path, ONE_RELS)


def test_verify_against_a_mirror(raw_tree, tmp_path):
    download_scannet(tmp_path, mirror=raw_tree, scenes=ONE)
    rel = "scans/scene0001_00/scene0001_00.aggregation.json"
    (tmp_path / rel).write_bytes(b"{}")
    download_scannet(tmp_path, mirror=raw_tree, scenes=ONE)
    assert (tmp_path / rel).read_bytes() == b"{}"  # right type: kept without verify
    download_scannet(tmp_path, mirror=raw_tree, scenes=ONE, verify=True)
    assert same_tree(raw_tree, tmp_path, ONE_RELS)


# --- secrets -------------------------------------------------------------------------------------

TOKEN = "tok3n-8f2c1d9e"


def test_personal_url_never_appears_in_errors(raw_tree, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(raw_tree, served / TOKEN / "v2")
    with serve_directory(served) as url:
        personal = f"{url}/{TOKEN}/v2"
        download_scannet(tmp_path / "ok", url=personal, scenes=ONE, policy=FAST)  # the URL works
        with pytest.raises(InputError) as missing:
            download_scannet(tmp_path / "a", url=personal, scenes=["scene0042_00"], policy=FAST)
        with_user = url.replace("://", f"://me:{TOKEN}@") + f"/{TOKEN}/v2"  # sent as basic auth
        download_scannet(tmp_path / "b", url=with_user, scenes=ONE, policy=FAST)
        with pytest.raises(InputError) as user_missing:
            download_scannet(tmp_path / "b", url=with_user, scenes=["scene0042_00"], policy=FAST)
    assert same_tree(raw_tree, tmp_path / "b", ONE_RELS)
    port = free_port()
    with pytest.raises(InputError) as refused:
        fetch(f"http://127.0.0.1:{port}/{TOKEN}/v2?key={TOKEN}", "a.txt", tmp_path, RetryPolicy(
            backoff_s=0.01, refused_retries=0))
    with pytest.raises(InputError) as scheme:
        fetch_all(f"ftp://user:{TOKEN}@example.org/x", ["a.txt"], tmp_path)
    for error in (missing, user_missing, refused, scheme):
        assert TOKEN not in str(error.value) and TOKEN not in repr(error.value.__cause__)
    assert f"{url}/***/scans/scene0042_00/" in str(missing.value) and "HTTP 404" in str(missing.value)
    assert "connection refused" in str(refused.value)


def test_token_in_the_query_is_kept_on_every_file_and_hidden_in_messages(raw_tree, tmp_path):
    log = []
    with serve_directory(raw_tree, log=log) as url:
        download_scannet(tmp_path, url=f"{url}/?key={TOKEN}", scenes=ONE, policy=FAST)
        fetched = sorted(p for p, _ in log)
        with pytest.raises(InputError) as missing:
            download_scannet(tmp_path, url=f"{url}?key={TOKEN}", scenes=["scene0042_00"], policy=FAST)
    assert same_tree(raw_tree, tmp_path, ONE_RELS) and fetched == sorted(ONE_RELS)
    assert TOKEN not in str(missing.value) and "HTTP 404" in str(missing.value)
