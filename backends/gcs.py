"""Google Cloud Storage through gcsfs."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from statefs.backends._endpoint import check_reachable
from statefs.backends.base import Backend, Capabilities
from statefs.errors import ConcurrentUpdateError

# A read that keeps finding a newer generation than the one it just listed
# gives up after this many attempts, because another writer is updating the
# object faster than it can be read.
_READ_ATTEMPTS = 5


class GCSBackend(Backend):
    """A GCS bucket.

    An object appears whole when its upload completes. `create_exclusive`
    sends `ifGenerationMatch=0`, which GCS enforces; gcp-storage-emulator
    accepts the parameter but does not enforce it. GCS stores a CRC32C of
    every object and returns it in listings, so `verify` needs no download.

    `compare_and_swap` uses the object's generation as the version token and
    uploads with `ifGenerationMatch=<generation>`, or `ifGenerationMatch=0`
    to require that no object exists. GCS gives every write a new
    generation, even one with the same bytes. gcp-storage-emulator accepts
    these preconditions too but does not enforce them.
    """

    protocols = ("gs", "gcs")
    capabilities = Capabilities(
        atomic_write=True, exclusive_create=True, native_checksum="crc32c", compare_and_swap=True
    )

    def check(self, path: str) -> None:
        check_reachable(getattr(self.fs, "_endpoint", None), "endpoint_url")

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.url(path)} already exists") from None
        finally:
            self.fs.invalidate_cache(path)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def read_generation() -> tuple[bytes, str] | None:
            metadata = await self.fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            generation = metadata["generation"]
            try:
                # Pinned to the generation just listed, so content and token match.
                _, data = await self.fs._call("GET", self.fs.url(path, generation=generation))
            except FileNotFoundError:
                return None
            return data, generation

        for _ in range(_READ_ATTEMPTS):
            # A missing object fails in the metadata request, with FileNotFoundError.
            found = sync(self.fs.loop, read_generation)
            if found is not None:
                return found
        raise OSError(
            f"Cannot read a consistent version of {self.url(path)}: another writer replaced it "
            f"{_READ_ATTEMPTS} times while it was read. Retry later."
        )

    def compare_and_swap(self, path: str, data: bytes, expected_token: str | None) -> str:
        bucket, key, _ = self.fs.split_path(path)
        upload_url = f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o"

        async def upload() -> dict[str, Any]:
            return await self.fs._call(
                "POST",
                upload_url,
                uploadType="media",
                name=key,
                ifGenerationMatch="0" if expected_token is None else expected_token,
                headers={"Content-Type": "application/octet-stream"},
                data=data,
                json_out=True,
            )

        try:
            # gcsfs raises FileExistsError for 412 Precondition Failed.
            metadata = sync(self.fs.loop, upload)
        except FileExistsError:
            raise ConcurrentUpdateError(self.url(path), expected_token) from None
        finally:
            self.fs.invalidate_cache(path)
        return metadata["generation"]

    def native_checksum(self, info: dict[str, Any]) -> str | None:
        # GCS returns the CRC32C as base64 of its big-endian bytes, the same
        # encoding statefs writes in manifests.
        return info.get("crc32c")
