"""S3 and GCS emulators on 127.0.0.1, for the demo and the tests.

Each server runs in a thread of the calling process, listens on 127.0.0.1
only, on a free port, and keeps objects in memory. `storage_options()`
returns what statefs and fsspec need to reach it. `env()` returns the same
settings as fsspec's `FSSPEC_<PROTOCOL>_<OPTION>` environment variables, so
a child process reaches the server with no code change.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.request
from typing import Any

# gcsfs probes every new bucket over gRPC for hierarchical namespace support.
# An emulator never responds, so each probe waits about a minute.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

HOST = "127.0.0.1"
# The emulators accept any credentials; these are placeholders, not secrets.
S3_KEY = "statefs-test"
S3_SECRET = "statefs-test"
S3_REGION = "us-east-1"


class S3Emulator:
    """moto's S3 server in a thread on 127.0.0.1.

    moto's in-process mock patches botocore in a way that breaks s3fs's
    async client, so the tests talk to the server over real HTTP.
    """

    def __init__(self) -> None:
        self._server = None
        self.endpoint_url = ""

    def start(self) -> S3Emulator:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"region_name": S3_REGION},
        }

    def env(self) -> dict[str, str]:
        return {
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_S3_KEY": S3_KEY,
            "FSSPEC_S3_SECRET": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
        }

    def create_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
        fs.call_s3("create_bucket", Bucket=name)

    def reset(self) -> None:
        """Delete every bucket and object."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> S3Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class GCSEmulator:
    """gcp-storage-emulator in a thread on 127.0.0.1, keeping objects in memory.

    It returns real CRC32C and MD5 values for objects, but it does not
    enforce `ifGenerationMatch` preconditions, so the race between two
    exclusive creates cannot be shown against it.
    """

    def __init__(self) -> None:
        self._server = None
        self.endpoint_url = ""

    def start(self) -> GCSEmulator:
        from gcp_storage_emulator.server import create_server

        # The emulator logs every lookup of a missing object as an error, and
        # statefs looks for manifests that are not there yet all the time.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        self._server = create_server(HOST, 0, in_memory=True)
        self._server.start()
        httpd = self._server._api._httpd
        # A client that closes a connection early makes the emulator print a
        # traceback for the broken pipe, which is noise rather than a failure.
        httpd.handle_error = _ignore_disconnects(httpd.handle_error)
        port = httpd.server_address[1]
        self.endpoint_url = f"http://{HOST}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": "statefs-test"}

    def env(self) -> dict[str, str]:
        return {
            "FSSPEC_GCS_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_GCS_TOKEN": "anon",
            "FSSPEC_GCS_PROJECT": "statefs-test",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> None:
        """Create a bucket; an existing one is kept, as moto does for S3 in us-east-1."""
        import gcsfs
        from gcsfs.retry import HttpError

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, **self.storage_options())
        try:
            fs.mkdir(name)
        except HttpError as error:
            # 409 Conflict: the bucket exists already.
            if error.code != 409:
                raise

    def reset(self) -> None:
        """Delete every bucket and object."""
        self._server.wipe()

    def __enter__(self) -> GCSEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _ignore_disconnects(handle_error):
    def handle(request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        handle_error(request, client_address)

    return handle
