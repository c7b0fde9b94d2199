"""fsspec's in-process `memory://` filesystem."""

from __future__ import annotations

import contextlib
import io
import threading
from typing import IO, Iterator

from statefs.backends.base import Backend, Capabilities, content_digest
from statefs.errors import ConcurrentUpdateError

# MemoryFileSystem keeps one store for the whole process, so one lock and one
# table of swap counts serve every instance.
_WRITE_LOCK = threading.Lock()
_SWAP_COUNTS: dict[str, int] = {}


class MemoryBackend(Backend):
    """The process-wide `memory://` store, mostly for tests and examples.

    fsspec's memory file enters the store as soon as it is opened, so writes
    here go to a private buffer that is stored whole on success. A lock makes
    `create_exclusive` and `compare_and_swap` exclusive between threads of
    this process. The version token is the number of swaps of the path plus
    a SHA-256 of the content, so every swap changes it, even one that writes
    the same bytes, and a `write_bytes` that bypasses the lock changes it too.
    """

    protocols = ("memory",)
    capabilities = Capabilities(atomic_write=True, exclusive_create=True, compare_and_swap=True)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        buffer = io.BytesIO()
        yield buffer
        self.fs.pipe_file(path, buffer.getvalue())

    def create_exclusive(self, path: str, data: bytes) -> None:
        with _WRITE_LOCK:
            if self.fs.exists(path):
                raise FileExistsError(f"{self.url(path)} already exists")
            self.fs.pipe_file(path, data)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        with _WRITE_LOCK:
            data = self.fs.cat_file(path)
            return data, _version_token(_SWAP_COUNTS.get(self._key(path), 0), data)

    def compare_and_swap(self, path: str, data: bytes, expected_token: str | None) -> str:
        key = self._key(path)
        with _WRITE_LOCK:
            swaps = _SWAP_COUNTS.get(key, 0)
            try:
                current_token = _version_token(swaps, self.fs.cat_file(path))
            except FileNotFoundError:
                current_token = None
            if current_token != expected_token:
                raise ConcurrentUpdateError(self.url(path), expected_token)
            self.fs.pipe_file(path, data)
            _SWAP_COUNTS[key] = swaps + 1
        return _version_token(swaps + 1, data)

    def _key(self, path: str) -> str:
        """Return `path` in the form the store keys it by, so one object has one count."""
        return self.fs._strip_protocol(path)


def _version_token(swaps: int, data: bytes) -> str:
    return f"{swaps}-{content_digest(data)}"
