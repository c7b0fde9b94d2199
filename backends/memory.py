"""fsspec's in-process `memory://` filesystem."""

from __future__ import annotations

import contextlib
import io
import threading
from typing import IO, Iterator

from statefs.backends.base import Backend, Capabilities

# MemoryFileSystem keeps one store for the whole process, so one lock serves
# every instance.
_CREATE_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """The process-wide `memory://` store, mostly for tests and examples.

    fsspec's memory file enters the store as soon as it is opened, so writes
    here go to a private buffer that is stored whole on success. A lock makes
    `create_exclusive` exclusive between threads of this process.
    """

    protocols = ("memory",)
    capabilities = Capabilities(atomic_write=True, exclusive_create=True)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        buffer = io.BytesIO()
        yield buffer
        self.fs.pipe_file(path, buffer.getvalue())

    def create_exclusive(self, path: str, data: bytes) -> None:
        with _CREATE_LOCK:
            if self.fs.exists(path):
                raise FileExistsError(f"{self.url(path)} already exists")
            self.fs.pipe_file(path, data)

