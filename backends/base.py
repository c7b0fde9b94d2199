"""The Backend contract: how statefs reaches bytes in one fsspec filesystem.

The core never branches on a protocol name. It calls the few operations
below and reads `capabilities` to choose a strategy, so a store with weaker
guarantees gets a warning rather than silently different semantics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from typing import IO, Any, ClassVar, Iterator

import fsspec

from statefs.errors import ConcurrentUpdateError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The guarantees of a store that the commit protocol chooses its strategy by.

    Attributes:
        atomic_write: an object written through `open_write` appears whole
            or not at all, even if the writer dies midway.
        exclusive_create: `create_exclusive` is enforced by the store itself,
            so two racing writers cannot both succeed.
        native_checksum: name of a checksum that the store computes and
            returns in its listing (for example `"crc32c"`), or `None`.
        compare_and_swap: `compare_and_swap` is enforced by the store or by a
            lock, so of two writers holding the same token only one succeeds.
    """

    atomic_write: bool
    exclusive_create: bool
    native_checksum: str | None = None
    compare_and_swap: bool = False

    def missing(self) -> list[str]:
        """Return the guarantees this store lacks, in words for a warning."""
        gaps = []
        if not self.atomic_write:
            gaps.append("atomic writes (a crash can leave a partial object)")
        if not self.exclusive_create:
            gaps.append("exclusive create (two writers can race on one commit)")
        if not self.compare_and_swap:
            gaps.append("compare-and-swap (two writers can overwrite each other's update of one object)")
        return gaps


class Backend:
    """One fsspec filesystem, seen through the operations statefs needs.

    Paths passed to and returned by these methods are in the filesystem's own
    form (no protocol), as `fsspec.core.url_to_fs` returns them. Subclasses
    override only what their store does better than the generic version.
    """

    protocols: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities(
        atomic_write=False, exclusive_create=False
    )

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.fs).__name__})"

    # Paths and names.

    def url(self, path: str) -> str:
        """Return the full URL of `path`, protocol included."""
        return self.fs.unstrip_protocol(path)

    def join(self, path: str, *parts: str) -> str:
        """Join path segments with the store's separator."""
        joined = path.rstrip("/")
        for part in parts:
            joined = f"{joined}/{part.strip('/')}"
        return joined

    def check(self, path: str) -> None:
        """Raise early if the store behind `path` cannot be reached.

        The default does nothing; remote backends fail fast here with a
        message that names the endpoint, before any model is trained.
        """

    # Listing. fsspec caches listings per instance; statefs must see what is
    # on the store now, so every listing drops the cache first.

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.isdir(path)

    def info(self, path: str) -> dict[str, Any]:
        """Return fsspec's info dict for one file; raises FileNotFoundError."""
        self.fs.invalidate_cache(path)
        return self.fs.info(path)

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        """Return the direct children of `path`; an absent folder is empty."""
        self.fs.invalidate_cache(path)
        try:
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    def find(self, path: str) -> dict[str, dict[str, Any]]:
        """Return every file under `path`, keyed by path relative to it."""
        self.fs.invalidate_cache(path)
        found = self.fs.find(path, detail=True)
        root = path.rstrip("/") + "/"
        return {
            name[len(root):]: info
            for name, info in found.items()
            if name.startswith(root) and info.get("type") != "directory"
        }

    # Reading and writing.

    # s3fs looks a file up in the instance's listing cache before reading
    # it, so a listing taken before a commit would hide the new manifest.

    def open_read(self, path: str) -> IO[bytes]:
        self.fs.invalidate_cache(path)
        return self.fs.open(path, "rb")

    def read_bytes(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        """Open `path` for writing; the object appears only if the block exits cleanly.

        On an exception the upload is discarded, so no partial object is left
        where the store allows it (see `capabilities.atomic_write`).
        """
        self.make_parents(path)
        handle = self.fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            self._discard(handle, path)
            raise
        handle.close()

    def _discard(self, handle: Any, path: str) -> None:
        """Abandon a failed write without hiding the error that caused it."""
        discard = getattr(handle, "discard", None)
        try:
            if discard is not None:
                discard()
        except Exception as error:
            # An S3 multipart or GCS resumable upload that is never completed
            # creates no object, so a failed cancel leaves no partial object.
            logger.warning("Cannot cancel the upload to %s: %s", self.url(path), error)
        try:
            # A buffered fsspec file commits on close(); marking it closed
            # makes a later close() or garbage collection a no-op.
            handle.closed = True
        except AttributeError:
            # A file built on io (fsspec's memory file, for one) has stored
            # each write already, so the partial object must be removed.
            handle.close()
            self.delete(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small object whole, replacing any object at `path`."""
        with self.open_write(path) as handle:
            handle.write(data)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Write `path` only if no object is there; raise FileExistsError if one is.

        The generic version checks and then writes, so two writers can race.
        Stores that do better override it and set `capabilities.exclusive_create`.
        """
        if self.exists(path):
            raise FileExistsError(f"{self.url(path)} already exists")
        self.write_bytes(path, data)

    def make_parents(self, path: str) -> None:
        """Create the folders above `path` on stores that have folders."""

    # Compare-and-swap of a small object, for updates that must not be lost
    # when two writers race, such as aliases and indexes.

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Return the content of `path` and an opaque version token for it.

        Pass the token to `compare_and_swap` to replace exactly this version.
        The generic token is a SHA-256 digest of the content, so writing the
        same bytes again keeps it. Backends with a version of their own
        (an ETag, a generation, a counter) return that instead.

        Raises:
            FileNotFoundError: no object exists at `path`.
        """
        data = self.read_bytes(path)
        return data, content_digest(data)

    def compare_and_swap(self, path: str, data: bytes, expected_token: str | None) -> str:
        """Write `data` to `path` only if the object is still at `expected_token`.

        `expected_token` is a token from `read_versioned`, or None to require
        that no object exists. Returns the token of the new content.

        The generic version reads, compares and then writes, which two
        writers can race. Stores that can do better override this method
        and `read_versioned` together, and set `capabilities.compare_and_swap`.

        NOTE: s3fs and gcsfs resend a request after a connection error. If
        the first attempt was stored, the resent one fails its precondition,
        so ConcurrentUpdateError can also mean that this writer's own update
        was stored.

        Raises:
            ConcurrentUpdateError: the object is at another version, was
                deleted, or exists although `expected_token` is None.
        """
        if expected_token is None:
            try:
                self.create_exclusive(path, data)
            except FileExistsError:
                raise ConcurrentUpdateError(self.url(path), expected_token) from None
            return content_digest(data)
        try:
            _, current_token = self.read_versioned(path)
        except FileNotFoundError:
            current_token = None
        if current_token != expected_token:
            raise ConcurrentUpdateError(self.url(path), expected_token)
        self.write_bytes(path, data)
        return content_digest(data)

    # Removal.

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def delete_tree(self, path: str) -> None:
        """Remove `path` and everything under it; a missing path is not an error."""
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    # Checksums kept by the store.

    def native_checksum(self, info: dict[str, Any]) -> str | None:
        """Return the store's own checksum from an info dict, in statefs's encoding.

        The default has none, so callers read the object and hash it.
        """
        return None


def content_digest(data: bytes) -> str:
    """Return the SHA-256 of `data` in hex, the version token of stores without versions."""
    return hashlib.sha256(data).hexdigest()
