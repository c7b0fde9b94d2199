"""Amazon S3 and S3-compatible stores through s3fs.

Endpoint and region of an S3-compatible store go in `storage_options`,
exactly as s3fs takes them: `{"endpoint_url": ..., "client_kwargs":
{"region_name": ...}}`.
"""

from __future__ import annotations

import contextlib
from typing import IO, Any, Iterator

from fsspec.asyn import sync

from statefs.backends._endpoint import check_reachable
from statefs.backends.base import Backend, Capabilities
from statefs.checksums import Crc32c
from statefs.errors import ConcurrentUpdateError

# S3 rejects a conditional write with 412 PreconditionFailed when the
# condition does not hold, and with 409 ConditionalRequestConflict when a
# concurrent write to the same key is in progress (Amazon S3 API reference,
# PutObject).
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


class S3Backend(Backend):
    """An S3 bucket.

    An object appears whole when its upload completes, and an aborted
    multipart upload leaves no object. `create_exclusive` sends
    `If-None-Match: *`, which S3 enforces on the server.
    `compare_and_swap` uses the ETag as the version token and sends it as
    `If-Match`, or `If-None-Match: *` to require that no object exists. The
    ETag of a plain single-part upload is the MD5 of the content, so writing
    the same bytes again can keep the token.
    """

    # NOTE: an S3-compatible store that ignores If-Match or If-None-Match
    # on PUT overwrites without checking, and statefs cannot tell from the
    # response.
    protocols = ("s3", "s3a")
    capabilities = Capabilities(atomic_write=True, exclusive_create=True, compare_and_swap=True)

    def check(self, path: str) -> None:
        endpoint = self.fs.endpoint_url or self.fs.client_kwargs.get("endpoint_url")
        check_reachable(endpoint, "endpoint_url")
        bucket = self.fs.split_path(path)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Bucket {bucket!r} does not exist at {endpoint or 'the default S3 endpoint'}. "
                "Create it first, or correct the URL."
            ) from None
        except PermissionError:
            # Anonymous or narrowly scoped credentials may read objects
            # without the right to look at the bucket itself.
            pass

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        """Open `path` for writing and send the object's CRC32C with a single-part upload.

        S3 checks the value against the bytes it receives and keeps it, so
        `native_checksum` can later read it back without a download. moto
        accepts the value but neither checks nor keeps it.
        """
        # TODO(#3): a multipart upload (objects above s3fs's block size,
        # 50 MiB by default) sends no checksum, so verifying it streams the
        # object.
        with super().open_write(path) as handle:
            writer = _ChecksummingWriter(handle)
            yield writer
            if getattr(handle, "mpu", None) is None and hasattr(handle, "kwargs"):
                handle.kwargs["ChecksumCRC32C"] = writer.checksum.value()

    def native_checksum(self, info: dict[str, Any]) -> str | None:
        """Return the full-object CRC32C that S3 keeps for the object, or None."""
        bucket, key, _ = self.fs.split_path(info["name"])
        try:
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except FileNotFoundError:
            return None
        value = head.get("ChecksumCRC32C")
        # A multipart object's checksum covers its parts ("<value>-<parts>"),
        # not the whole content, so it cannot be compared with a manifest.
        if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        return value

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.url(path)} already exists") from None
        finally:
            self.fs.invalidate_cache(path)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def get_object() -> tuple[bytes, str]:
            # One GET returns the content and the ETag of the same version.
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return sync(self.fs.loop, get_object)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.url(path)} not found: {error}") from None

    def compare_and_swap(self, path: str, data: bytes, expected_token: str | None) -> str:
        bucket, key, _ = self.fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if expected_token is None else {"IfMatch": expected_token}
        try:
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as error:
            code = _error_code(error)
            # moto rejects If-Match on a deleted key with 404 NoSuchKey, not 412.
            if code in _CONFLICT_CODES or code == "NoSuchKey":
                raise ConcurrentUpdateError(self.url(path), expected_token) from None
            raise
        finally:
            self.fs.invalidate_cache(path)
        return response["ETag"]


def _error_code(error: OSError) -> str | None:
    """Return the S3 error code of the botocore error that s3fs translated into `error`."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


class _ChecksummingWriter:
    """A write-only file that hashes what passes through to the S3 file below."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.checksum = Crc32c()

    def write(self, data: bytes) -> int:
        self.checksum.update(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)
