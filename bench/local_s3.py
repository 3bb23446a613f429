"""A throwaway local S3-protocol server (moto's ``moto_server``, in its own process), for the
tests of the S3 blob store (tests/store). Tooling: part of the ``prefix-serve-bench``
distribution, never of the server.

It speaks S3 over real HTTP on a free loopback port and keeps everything in memory: ``kill``
loses the data, ``pause`` / ``resume`` (SIGSTOP / SIGCONT) make an outage that keeps it.
``env`` is what a client needs (endpoint, region, credentials), as AWS environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.local_process import LocalProcess, free_port

REGION = "us-east-1"
ACCESS_KEY = "prefix-serve-test"
SECRET_KEY = "prefix-serve-test-secret"


class LocalS3(LocalProcess):
    """moto_server on a free loopback port, its log in ``workdir``. With ``check_credentials``
    it refuses any access key it does not know (moto's IAM checks), which is every key."""

    def __init__(self, workdir: str | os.PathLike[str], *, check_credentials: bool = False):
        super().__init__()
        self.dir = Path(workdir)
        self.port = free_port()
        self.check_credentials = check_credentials
        self._client = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        with open(self.dir / "moto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {self.dir}") from None
                time.sleep(0.05)

    def client(self):
        """A boto3 S3 client for this server (made once): for setting up buckets, and for
        tests that look at the bucket directly."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
            )
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)
