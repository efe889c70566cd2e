"""Fixtures with a real S3-compatible server: moto's server mode on 127.0.0.1, started once per session.

`s3_bucket` gives each test its own empty bucket and points the AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) at the server
for the test's duration; subprocesses the test starts inherit it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.servers import s3_environment, start_moto, stop

_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Bucket:
    name: str
    endpoint: str
    env: dict[str, str]

    def url(self, *path: str) -> str:
        return "/".join([f"s3://{self.name}", *path])

    def client(self):
        """A boto3 client for the server (to look at what was written, independently of the code)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server for the whole session; stopped by pid at the end."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = start_moto(log)
    try:
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def s3_bucket(moto_server, tmp_path, monkeypatch) -> S3Bucket:
    """A fresh bucket on the session's moto server, with the AWS environment set for this test."""
    env = s3_environment(moto_server, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    bucket = S3Bucket(f"xmask3d-test-{os.getpid()}-{next(_bucket_numbers)}", moto_server, env)
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
