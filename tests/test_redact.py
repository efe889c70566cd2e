"""Credentials in URLs are hidden in every message (storage/redact.py, the MLflow tracking checks)."""

from __future__ import annotations

import pytest

from storage.errors import InputError
from storage.redact import public_base, redact, redact_url, secrets_in_url
from tests.servers import free_port
from xmask3d.engine import tracking

TOKEN = "pa55-t0ken"


@pytest.mark.parametrize("url, expected", [
    (f"https://alice:{TOKEN}@mlflow.example.org:5000/x", "https://alice:***@mlflow.example.org:5000/x"),
    (f"https://{TOKEN}@host/x", "https://***@host/x"),
    (f"https://host/data?token={TOKEN}&sig={TOKEN}", "https://host/data?token=***&sig=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_public_base_hides_everything_after_the_host():
    assert public_base(f"https://dl.example.org/{TOKEN}/scannet/v2") == "https://dl.example.org/***"
    assert public_base(f"http://u:{TOKEN}@127.0.0.1:8080") == "http://127.0.0.1:8080/***"
    assert public_base("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"


def test_redact_free_text():
    text = (f"cannot reach https://bob:{TOKEN}@h/api (got 'https://h/?k={TOKEN}'); "
            f"bad port '{TOKEN}@h:5000'")
    out = redact(text, secrets_in_url(f"https://bob:{TOKEN}@h/api"))
    assert TOKEN not in out and "https://bob:***@h/api" in out and "https://h/?k=***" in out
    assert set(secrets_in_url(f"https://h/?k={TOKEN}%21")) == {f"{TOKEN}%21", f"{TOKEN}!"}


def test_tracking_errors_hide_the_credentials(tmp_path):
    port = free_port()  # nobody listens there
    for uri in (f"http://alice:{TOKEN}@127.0.0.1:{port}", f"http://{TOKEN}@127.0.0.1:{port}",
                f"http://alice:{TOKEN}@127.0.0.1:notaport", f"http://127.0.0.1:{port}/?token={TOKEN}"):
        with pytest.raises(InputError, match="is not reachable") as error:
            tracking.check_tracking_available(uri, timeout=2)
        assert TOKEN not in str(error.value) and error.value.__cause__ is None, str(error.value)
    with pytest.raises(InputError, match="does not exist") as error:
        tracking.check_tracking_available(f"sqlite:///{tmp_path}/missing/db.sqlite?x={TOKEN}")
    assert TOKEN not in str(error.value)
