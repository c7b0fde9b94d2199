"""Local disk: plain paths and `file://` URLs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from statefs.backends.base import Backend, Capabilities


class LocalBackend(Backend):
    """A folder on local disk.

    A write goes to a temporary file beside the target, is flushed with
    fsync, and then renamed into place, so readers see the old object or the
    whole new one. `create_exclusive` links the temporary file to the target
    name, which the kernel refuses if the name exists.
    """

    protocols = ("file", "local")
    capabilities = Capabilities(atomic_write=True, exclusive_create=True)

    def make_parents(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        with self._temporary_beside(path) as (handle, temporary):
            yield handle
            _flush_to_disk(handle)
            handle.close()
            os.replace(temporary, path)
        _fsync_folder(os.path.dirname(path))

    def create_exclusive(self, path: str, data: bytes) -> None:
        with self._temporary_beside(path) as (handle, temporary):
            handle.write(data)
            _flush_to_disk(handle)
            handle.close()
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists") from None
        _fsync_folder(os.path.dirname(path))

    @contextlib.contextmanager
    def _temporary_beside(self, path: str) -> Iterator[tuple[IO[bytes], str]]:
        """Yield a new temporary file in the folder of `path`; always remove it after."""
        self.make_parents(path)
        folder, name = os.path.split(path)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        handle = os.fdopen(descriptor, "wb")
        try:
            yield handle, temporary
        finally:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def _flush_to_disk(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_folder(folder: str) -> None:
    """Make a rename or link in `folder` durable."""
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
