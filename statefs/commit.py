"""The commit protocol: how a unit is written, recognised, read and removed.

A unit is committed if and only if its manifest exists and parses. Writing
one takes three steps, the same on every backend:

1. claim the prefix with an exclusive create of `.statefs-claim`, so two
   writers never mix payload files under one prefix;
2. upload every payload file, hashing each while it streams;
3. create the manifest exclusively, last.

A reader that lists units, or a `latest()` that picks one, reads manifests
only, so a writer that dies at any point leaves a fragment that no reader
counts. The claim costs one small object per unit. Without it, two writers
that pick the same step or version number would overwrite each other's
payload files before either commit could fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator

from statefs.backends import Backend
from statefs.checksums import Crc32c, Digest, copy_stream
from statefs.errors import IntegrityError, ManifestError, NotCommittedError, UnitExistsError
from statefs.manifest import MANIFEST_NAME, Manifest, check_relative_path, utc_now

logger = logging.getLogger(__name__)

CLAIM_NAME = ".statefs-claim"


def library_versions() -> dict[str, str]:
    """Return the versions of statefs and of the frameworks already imported."""
    from statefs import __version__

    versions = {"statefs": __version__}
    for name in ("keras", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = module.__version__
    return versions


class UnitWriter:
    """Writes one unit at `prefix`: claim, payload, then the manifest.

    Example:

    ```python
    writer = UnitWriter(backend, "bucket/run/ckpt-12", kind="checkpoint")
    with writer.claimed():
        writer.put_file("/tmp/stage/checkpoint.weights.h5", "checkpoint.weights.h5")
        manifest = writer.commit()
    ```
    """

    def __init__(
        self,
        backend: Backend,
        prefix: str,
        *,
        kind: str,
        metadata: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.prefix = prefix.rstrip("/")
        self.kind = kind
        self.metadata = dict(metadata or {})
        # A copy keeps the versions of the libraries that wrote the payload.
        self.versions = versions
        self.files: dict[str, Digest] = {}

    @property
    def url(self) -> str:
        return self.backend.url(self.prefix)

    def claim(self) -> None:
        """Reserve the prefix; raise UnitExistsError if a unit or a fragment is there."""
        # Some stores accept the exclusive-create precondition without enforcing
        # it (gcp-storage-emulator, some S3-compatible servers). Reading the
        # manifest first keeps a later save from overwriting a committed unit
        # there; only two writers racing still depend on the store.
        if read_manifest(self.backend, self.prefix) is not None:
            raise UnitExistsError(f"{self.url} is already committed; statefs never overwrites a unit.")
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        try:
            self.backend.create_exclusive(self._path(CLAIM_NAME), json.dumps(claim).encode())
        except FileExistsError:
            if read_manifest(self.backend, self.prefix) is not None:
                raise UnitExistsError(f"{self.url} is already committed; statefs never overwrites a unit.") from None
            raise UnitExistsError(
                f"{self.url} contains an unfinished write (a claim without a manifest). Another writer "
                "is running there, or one failed. Delete that prefix if no writer is running."
            ) from None
        logger.debug("Claimed %s", self.url)

    @contextlib.contextmanager
    def claimed(self) -> Iterator[UnitWriter]:
        """Claim the prefix for the block; if the block raises, remove what this writer wrote.

        A writer that is killed outright still leaves its fragment, which
        readers ignore and the next save at that prefix, or gc, removes.
        """
        self.claim()
        try:
            yield self
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        try:
            if read_manifest(self.backend, self.prefix) is None:
                self.backend.delete_tree(self.prefix)
                logger.info("Removed the unfinished write at %s", self.url)
        except Exception as error:
            # The error that stopped the write matters more than this one.
            logger.warning("Cannot remove the unfinished write at %s: %s", self.url, error)

    def put_file(self, local_path: str, relative_path: str) -> Digest:
        """Upload one local file into the unit, hashing it as it streams."""
        with open(local_path, "rb") as source, self.backend.open_write(self._path(relative_path)) as target:
            digest = copy_stream(source, target)
        return self._record(relative_path, digest)

    def put_chunks(self, relative_path: str, chunks: Iterable[Any]) -> Digest:
        """Upload the concatenation of `chunks` (read-only bytes-like objects) as one file, hashing as it streams."""
        checksum = Crc32c()
        size = 0
        with self.backend.open_write(self._path(relative_path)) as target:
            for chunk in chunks:
                checksum.update(chunk)
                target.write(chunk)
                size += memoryview(chunk).nbytes
        return self._record(relative_path, Digest(size=size, crc32c=checksum.value()))

    def put_folder(self, local_folder: str, *, last: Iterable[str] = ()) -> None:
        """Upload every file under `local_folder`; names in `last` go after the others."""
        found = set(_walk_files(local_folder))
        last = [path for path in last if path in found]
        for relative_path in sorted(found - set(last)) + last:
            self.put_file(os.path.join(local_folder, relative_path), relative_path)

    def copy_file(self, source: Backend, source_path: str, relative_path: str, expected: Digest) -> Digest:
        """Stream one file from another store into the unit and check it against `expected`."""
        with source.open_read(source_path) as reader, self.backend.open_write(self._path(relative_path)) as target:
            digest = copy_stream(reader, target)
        check_digest(source.url(source_path), expected, digest)
        return self._record(relative_path, digest)

    def commit(self) -> Manifest:
        """Write the manifest, which makes the unit visible to every reader."""
        manifest = Manifest(
            kind=self.kind,
            files=dict(self.files),
            metadata=self.metadata,
            versions=self.versions or library_versions(),
            created=utc_now(),
        )
        self.backend.create_exclusive(self._path(MANIFEST_NAME), manifest.to_json())
        logger.info("Committed %s %s (%d files, %d bytes)", self.kind, self.url, len(self.files), manifest.total_size())
        return manifest

    def _record(self, relative_path: str, digest: Digest) -> Digest:
        self.files[relative_path] = digest
        logger.debug("Wrote %s/%s (%d bytes)", self.url, relative_path, digest.size)
        return digest

    def _path(self, relative_path: str) -> str:
        # Checked before any byte is written, so `..` cannot reach outside the unit.
        return self.backend.join(self.prefix, check_relative_path(relative_path, self.url))


def read_manifest(backend: Backend, prefix: str) -> Manifest | None:
    """Return the manifest of the unit at `prefix`, or None if it has none.

    Raises:
        ManifestError: a manifest exists but is invalid.
    """
    path = backend.join(prefix, MANIFEST_NAME)
    try:
        data = backend.read_bytes(path)
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, source=backend.url(path))


def require_manifest(backend: Backend, prefix: str, description: str = "unit") -> Manifest:
    """Return the manifest at `prefix`; raise NotCommittedError if there is none."""
    manifest = read_manifest(backend, prefix)
    if manifest is None:
        raise NotCommittedError(
            f"No committed {description} at {backend.url(prefix)}: {MANIFEST_NAME} is missing, so it is "
            "absent or was never completely written."
        )
    return manifest


def list_children(backend: Backend, root: str) -> dict[str, str]:
    """Return the child folders of `root` as {name: path}."""
    children = {}
    for info in backend.list_dir(root):
        if info.get("type") == "directory":
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            children[name] = info["name"].rstrip("/")
    return children


def committed_manifest_or_none(backend: Backend, prefix: str) -> Manifest | None:
    """Like read_manifest, but an invalid manifest counts as no commit, with a warning."""
    try:
        return read_manifest(backend, prefix)
    except ManifestError as error:
        logger.warning("Ignoring %s: %s", backend.url(prefix), error)
        return None


def delete_unit(backend: Backend, prefix: str) -> None:
    """Remove a unit: its manifest first, so that it stops counting at once."""
    backend.delete(backend.join(prefix, MANIFEST_NAME))
    backend.delete_tree(prefix)
    logger.info("Deleted %s", backend.url(prefix))


def remove_fragment(backend: Backend, prefix: str) -> bool:
    """Delete the prefix if it has a claim but no manifest, and return whether it did."""
    if read_manifest(backend, prefix) is not None or not backend.exists(backend.join(prefix, CLAIM_NAME)):
        return False
    logger.warning("Removing unfinished write at %s (a claim without a manifest)", backend.url(prefix))
    backend.delete_tree(prefix)
    return True


def check_digest(url: str, expected: Digest, found: Digest, *, checksum: bool = True) -> None:
    """Raise IntegrityError if `found` differs from `expected` in size, or in CRC32C when `checksum` is set."""
    if found.size != expected.size:
        raise IntegrityError(url, "size", expected.size, found.size)
    if checksum and found.crc32c != expected.crc32c:
        raise IntegrityError(url, "crc32c", expected.crc32c, found.crc32c)


def download_unit(
    backend: Backend, prefix: str, manifest: Manifest, local_folder: str, *, verify_checksums: bool = True
) -> None:
    """Download every file of a unit into `local_folder`, checking each against the manifest.

    Sizes are always checked; CRC32C values unless `verify_checksums` is False.
    """
    root = os.path.realpath(local_folder)
    for relative_path, expected in manifest.files.items():
        target = os.path.realpath(os.path.join(root, check_relative_path(relative_path)))
        if os.path.commonpath([root, target]) != root:
            raise ManifestError(f"Manifest path {relative_path!r} leads outside {local_folder}.")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source_path = backend.join(prefix, relative_path)
        try:
            with backend.open_read(source_path) as reader, open(target, "wb") as writer:
                digest = copy_stream(reader, writer)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{backend.url(source_path)} is listed in the manifest but missing. "
                "The unit is damaged; restore it from another copy."
            ) from None
        check_digest(backend.url(source_path), expected, digest, checksum=verify_checksums)


def verify_unit(backend: Backend, prefix: str, manifest: Manifest) -> list[IntegrityError | FileNotFoundError]:
    """Return every problem found when the stored files are checked against the manifest.

    Sizes come from one listing. Checksums come from the listing too where
    the store keeps a compatible one (GCS), and from streaming each file
    otherwise.
    """
    stored = backend.find(prefix)
    problems: list[IntegrityError | FileNotFoundError] = []
    for relative_path, expected in manifest.files.items():
        url = backend.url(backend.join(prefix, relative_path))
        info = stored.get(relative_path)
        if info is None:
            problems.append(FileNotFoundError(f"{url} is listed in the manifest but missing."))
            continue
        if info.get("size") != expected.size:
            problems.append(IntegrityError(url, "size", expected.size, info.get("size")))
            continue
        checksum = backend.native_checksum(info)
        if checksum is None:
            with backend.open_read(backend.join(prefix, relative_path)) as reader:
                checksum = copy_stream(reader).crc32c
        if checksum != expected.crc32c:
            problems.append(IntegrityError(url, "crc32c", expected.crc32c, checksum))
    return problems


@contextlib.contextmanager
def staging_folder(purpose: str) -> Iterator[str]:
    """Yield a new local folder for serialization; it is removed on success and on error."""
    with tempfile.TemporaryDirectory(prefix=f"statefs-{purpose}-") as folder:
        yield folder


def _walk_files(folder: str) -> Iterator[str]:
    for parent, _, names in os.walk(folder):
        for name in names:
            yield os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
