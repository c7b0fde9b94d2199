"""Local disk: plain paths and `file://` URLs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from statefs.backends.base import Backend, Capabilities, content_digest
from statefs.errors import ConcurrentUpdateError

try:
    import fcntl
except ImportError:  # Windows has no flock
    fcntl = None


class LocalBackend(Backend):
    """A folder on local disk.

    A write goes to a temporary file beside the target, is flushed with
    fsync, and then renamed into place, so readers see the old object or the
    whole new one. `create_exclusive` links the temporary file to the target
    name, which the kernel refuses if the name exists.

    `compare_and_swap` holds an exclusive `flock` on a lock file beside the
    object (`.<name>.lock`) while it compares and writes, and the lock file
    stores how many swaps the object has had. The version token is that
    count plus a SHA-256 of the content. The count makes every swap change
    the token, even one that writes the same bytes. A token made of mtime
    and inode would not guarantee that, because the kernel reuses inode
    numbers and the file system clock can give two writes the same mtime.
    The digest catches writes that bypass the lock, such as `write_bytes`.
    """

    protocols = ("file", "local")
    capabilities = Capabilities(
        atomic_write=True, exclusive_create=True, compare_and_swap=fcntl is not None
    )

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

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        # No lock is needed to read. A swap that runs between the two reads
        # below yields a token that matches no version, so the caller's swap
        # fails and it reads again.
        swaps = _read_swap_count(_lock_path(path))
        with open(path, "rb") as handle:
            data = handle.read()
        return data, _version_token(swaps, data)

    def compare_and_swap(self, path: str, data: bytes, expected_token: str | None) -> str:
        self.make_parents(path)
        with _exclusive_lock(_lock_path(path)) as lock:
            swaps = _read_swap_count_locked(lock)
            try:
                with open(path, "rb") as handle:
                    current_token = _version_token(swaps, handle.read())
            except FileNotFoundError:
                current_token = None
            if current_token != expected_token:
                raise ConcurrentUpdateError(self.url(path), expected_token)

            # The count goes up before the object changes, so even a crash
            # between the two steps cannot leave new content under an old count.
            _write_swap_count(lock, swaps + 1)
            if expected_token is None:
                # A hard link, unlike rename, also fails against a
                # create_exclusive that does not take the lock.
                try:
                    self.create_exclusive(path, data)
                except FileExistsError:
                    raise ConcurrentUpdateError(self.url(path), expected_token) from None
            else:
                self.write_bytes(path, data)
        return _version_token(swaps + 1, data)

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


def _lock_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.lock")


def _version_token(swaps: int, data: bytes) -> str:
    return f"{swaps}-{content_digest(data)}"


@contextlib.contextmanager
def _exclusive_lock(lock_path: str) -> Iterator[int]:
    """Hold an exclusive flock on `lock_path` and yield its descriptor."""
    if fcntl is None:
        raise NotImplementedError(
            f"Cannot lock {lock_path}: compare-and-swap of local files needs fcntl.flock, "
            "which this platform does not have."
        )
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            locked_current_file = _is_current_file(descriptor, lock_path)
        except BaseException:
            os.close(descriptor)
            raise
        if locked_current_file:
            break
        # delete_tree removed the lock file while this writer waited for it.
        # A lock on a removed file excludes no one, so lock the new one.
        os.close(descriptor)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _is_current_file(descriptor: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def _read_swap_count(lock_path: str) -> int:
    try:
        with open(lock_path, "rb") as handle:
            return _parse_swap_count(handle.read())
    except FileNotFoundError:
        return 0


def _read_swap_count_locked(descriptor: int) -> int:
    return _parse_swap_count(os.pread(descriptor, 32, 0))


def _parse_swap_count(text: bytes) -> int:
    # An empty lock file belongs to an object that has had no swap yet. A
    # damaged one reads as -1 for readers and writers alike, and the next
    # swap stores 0.
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        return -1


def _write_swap_count(descriptor: int, swaps: int) -> None:
    # No fsync: if a crash loses this write, the object's token still
    # differs from every earlier one, unless the content is identical too.
    encoded = str(swaps).encode()
    os.pwrite(descriptor, encoded, 0)
    os.ftruncate(descriptor, len(encoded))
