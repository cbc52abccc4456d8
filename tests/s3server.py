"""A real S3-compatible server on loopback for the storage tests: moto's server mode (`moto[server]`,
installed by the dev extra), started once per test session in a thread of the test process.

URIs name the server in their query string, as a user of MinIO or another S3-compatible store would:
`s3://kesi-tests/<prefix>?endpoint_override=127.0.0.1:<port>&scheme=http`. Credentials are dummy
AWS_* environment variables; subprocesses (`kesi run`) and the Ray workers they start inherit them.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Iterator

BUCKET = "kesi-tests"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port

    @property
    def query(self) -> str:
        return f"?endpoint_override={self.endpoint}&scheme=http"

    def uri(self, path: str = "") -> str:
        """A URI under a fresh prefix of the test bucket (`path` appended), so tests never share keys."""
        key = "/".join(p for p in (uuid.uuid4().hex[:12], path.strip("/")) if p)
        return f"s3://{BUCKET}/{key}{self.query}"

    def filesystem(self):
        """pyarrow's S3FileSystem on this server (for looking at the raw keys)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)


def serve() -> Iterator[S3Server]:
    """Start moto on 127.0.0.1 (a free port), set dummy credentials, create the bucket; stop at the end.

    Fails (ImportError naming the extra) when moto is missing: the S3 tests must never skip silently.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ImportError(f"the S3 tests need moto's server ({e}): pip install -e '.[dev]' (./dev setup)") from None
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"{host}:{port}")
        s3.filesystem().create_dir(BUCKET)
        yield s3
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
