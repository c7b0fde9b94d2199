"""Google Cloud Storage through gcsfs."""

from __future__ import annotations

from typing import Any

from statefs.backends._endpoint import check_reachable
from statefs.backends.base import Backend, Capabilities


class GCSBackend(Backend):
    """A GCS bucket.

    An object appears whole when its upload completes. `create_exclusive`
    sends `ifGenerationMatch=0`, which GCS enforces; gcp-storage-emulator
    accepts the parameter but does not enforce it. GCS stores a CRC32C of
    every object and returns it in listings, so `verify` needs no download.
    """

    protocols = ("gs", "gcs")
    capabilities = Capabilities(atomic_write=True, exclusive_create=True, native_checksum="crc32c")

    def check(self, path: str) -> None:
        check_reachable(getattr(self.fs, "_endpoint", None), "endpoint_url")

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.url(path)} already exists") from None
        finally:
            self.fs.invalidate_cache(path)

    def native_checksum(self, info: dict[str, Any]) -> str | None:
        # GCS returns the CRC32C as base64 of its big-endian bytes, the same
        # encoding statefs writes in manifests.
        return info.get("crc32c")
