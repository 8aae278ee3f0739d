"""A local S3-compatible server for the object-store tests: moto's server on a loopback port,
reached over HTTP by s3fs the way a cluster reaches its bucket, with credentials and the
endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import pytest
import s3fs
from moto.server import ThreadedMotoServer


@contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Start the server; yields its endpoint URL with the environment pointing at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # none bound to an earlier test's endpoint
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def make_bucket(endpoint: str, name: str, refuse_writes: bool = False, refuse_deletes: bool = False) -> str:
    """Create a bucket; ``refuse_writes`` / ``refuse_deletes``: a bucket policy denies every
    PutObject / DeleteObject (a read-only bucket, credentials without those rights).
    Returns ``s3://name``."""
    s3 = client(endpoint)
    s3.create_bucket(Bucket=name)
    actions = ["s3:PutObject"] * refuse_writes + ["s3:DeleteObject"] * refuse_deletes
    if actions:
        deny = {"Effect": "Deny", "Principal": "*", "Action": actions, "Resource": f"arn:aws:s3:::{name}/*"}
        s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    return f"s3://{name}"
