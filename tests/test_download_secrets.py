"""The personal download URL stays secret through a real flow run: read from the environment, never
a parameter, and its token appears nowhere in Prefect's database, its logs or the console output."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path

import pytest

from flows import preprocess as pf
from storage.errors import InputError
from tests.http_server import serve_directory

TOKEN = "s3cr3t-7b41e0"


def _forms(secret: str) -> list[bytes]:
    """``secret`` as plain bytes and as it would appear inside base64 text at any alignment (Prefect
    stores pickled results and exceptions base64-encoded)."""
    forms = [secret.encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret.encode())
        forms.append(encoded[(shift * 4 + 2) // 3 + 1:-4])
    return forms


def _prefect_bytes() -> bytes:
    """Every file of the test API's database (with its WAL; the session's, so other tests' runs are
    in it too) and of PREFECT_HOME."""
    from prefect.settings import get_current_settings

    db = Path(get_current_settings().server.database.connection_url.get_secret_value().split("///", 1)[1])
    files = list(db.parent.glob(db.name + "*")) + [p for p in Path(os.environ["PREFECT_HOME"]).rglob("*")
                                                    if p.is_file()]
    return b"".join(p.read_bytes() for p in files)


@pytest.mark.slow
def test_flow_with_the_url_in_the_environment_leaks_no_token(prefect_api, synthetic_scannet, tmp_path,
                                                             monkeypatch, caplog, capfd):
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    first = sorted(p.name for p in (Path(synthetic_scannet) / "scans").iterdir())[0]
    served = tmp_path / "served"
    shutil.copytree(synthetic_scannet, served / TOKEN / "v2",
                    ignore=lambda d, names: [n for n in names if n.startswith("scene") and n != first
                                             and Path(d).name == "scans"])
    raw, store = tmp_path / "raw", tmp_path / "s.zarr"
    with caplog.at_level(logging.INFO), serve_directory(served) as url:
        monkeypatch.setenv("XMASK3D_SCANNET_URL", f"{url}/{TOKEN}/v2?key={TOKEN}")
        summaries = pf.preprocess(raw_dir=str(raw), store=str(store), url_from="env", scenes=[first],
                                  captions="none", workers=1)
        assert [s.status for s in summaries] == ["written"]
        assert (raw / "scans" / first / f"{first}.sens").is_file()
        # a failing download: its message names the file, not the token
        failed = pf.preprocess(raw_dir=str(tmp_path / "raw2"), store=str(tmp_path / "t.zarr"), url_from="env",
                               scenes=["scene0042_00"], captions="none", workers=1, return_state=True)
        assert failed.is_failed() and "scene0042_00" in failed.message and "HTTP 404" in failed.message
        APILogWorker.drain_all()
        EventsWorker.drain_all()
        stored = _prefect_bytes()
    assert str(raw).encode() in stored and b"scene0042_00" in stored  # the runs were recorded
    flat = stored.replace(b"\n", b"")
    assert not [form for form in _forms(TOKEN) if form in flat]
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err
    assert "HTTP 404" in caplog.text + out + err  # the failure was logged, without the token


def test_url_from_is_validated(monkeypatch):
    monkeypatch.delenv("XMASK3D_SCANNET_URL", raising=False)
    with pytest.raises(InputError, match=r"XMASK3D_SCANNET_URL is not set"):
        pf.download_url("scannet", "env")
    with pytest.raises(InputError, match="url_from must be 'env' or 'secret:") as error:
        pf.download_url("s3dis", f"https://host/{TOKEN}")
    assert TOKEN not in str(error.value)
    monkeypatch.setenv("XMASK3D_S3DIS_URL", "https://example.org/x")
    assert pf.download_url("s3dis", "env") == "https://example.org/x"
