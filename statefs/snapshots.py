"""Single-file snapshots of a whole model: `.keras`, `.h5` or `.weights.h5`."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from statefs import backends
from statefs.backends import Backend
from statefs.checksums import Digest, copy_stream
from statefs.commit import check_digest, library_versions, staging_folder
from statefs.errors import ManifestError
from statefs.manifest import Manifest

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".statefs-manifest.json"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A stored snapshot: where it is, its format, size and CRC32C."""

    url: str
    format: str
    size: int
    crc32c: str


def save_snapshot(
    model: Any,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Snapshot:
    """Save the whole model as one file at `url`; the suffix selects the format.

    The file appears whole or not at all (temporary file and rename on local
    disk, a single completed upload on object stores). Its size and CRC32C go
    to `<url>.statefs-manifest.json` beside it, where loads and `verify` find
    them, together with `metadata` (JSON values) if given. An existing
    snapshot at `url` is replaced.

    Example:

    ```python
    statefs.save_snapshot(model, "s3://bucket/snap/digits.keras")
    model = statefs.load_snapshot("s3://bucket/snap/digits.keras")
    ```

    Raises:
        ValueError: the suffix is not `.keras`, `.h5` or `.weights.h5`.
    """
    from statefs import keras_io

    fmt = keras_io.snapshot_format(url)
    backend, path = backends.resolve(url, storage_options)
    backend.check(path)
    with staging_folder("snapshot") as staging:
        local_file = os.path.join(staging, "model" + keras_io.snapshot_suffix(url))
        keras_io.save_model_file(model, local_file)
        return upload_snapshot(local_file, backend, path, fmt, metadata=metadata)


def load_snapshot(
    url: str,
    *,
    model: Any = None,
    storage_options: dict[str, Any] | None = None,
    verify_checksums: bool = True,
    compile: bool = True,
) -> Any:
    """Load a snapshot saved by `save_snapshot` (or any Keras file) from `url`.

    Args:
        url: the snapshot file.
        model: for a `.weights.h5` file, the model to load the weights into.
        storage_options: passed to the fsspec filesystem untouched.
        verify_checksums: check the CRC32C recorded in the sidecar manifest, if
            one exists. The size is checked either way.
        compile: restore the compile settings where the format carries them.

    Raises:
        FileNotFoundError: there is no file at `url`.
        IntegrityError: the file differs from its sidecar manifest.
    """
    from statefs import keras_io

    keras_io.snapshot_format(url)
    backend, path = backends.resolve(url, storage_options)
    backend.check(path)
    with staging_folder("snapshot") as staging:
        local_file = os.path.join(staging, "model" + keras_io.snapshot_suffix(url))
        download_snapshot(backend, path, local_file, verify_checksums=verify_checksums)
        return keras_io.load_model_file(local_file, model=model, compile=compile, source=backend.url(path))


def upload_snapshot(
    local_file: str, backend: Backend, path: str, fmt: str, *, metadata: dict[str, Any] | None = None
) -> Snapshot:
    """Upload a local snapshot file and its sidecar manifest."""
    with open(local_file, "rb") as source, backend.open_write(path) as target:
        digest = copy_stream(source, target)
    write_sidecar(backend, path, fmt, digest, metadata=metadata)
    logger.info("Saved snapshot %s (%d bytes)", backend.url(path), digest.size)
    return Snapshot(url=backend.url(path), format=fmt, size=digest.size, crc32c=digest.crc32c)


def download_snapshot(backend: Backend, path: str, local_file: str, *, verify_checksums: bool = True) -> Digest:
    """Download a snapshot to `local_file`, checking it against its sidecar if there is one."""
    if not backend.exists(path):
        raise FileNotFoundError(f"No snapshot at {backend.url(path)}.")
    with backend.open_read(path) as reader, open(local_file, "wb") as writer:
        digest = copy_stream(reader, writer)
    expected = read_sidecar(backend, path)
    if expected is not None:
        check_digest(backend.url(path), expected, digest, checksum=verify_checksums)
    return digest


def read_sidecar(backend: Backend, path: str) -> Digest | None:
    """Return the recorded digest of the snapshot at `path`, or None if it has no sidecar."""
    manifest = read_sidecar_manifest(backend, path)
    return None if manifest is None else manifest.files[_file_name(path)]


def read_sidecar_manifest(backend: Backend, path: str) -> Manifest | None:
    """Return the sidecar manifest of the snapshot at `path`, or None if it has none.

    Raises:
        ManifestError: the sidecar is not a valid snapshot manifest for `path`.
    """
    sidecar = path + SIDECAR_SUFFIX
    try:
        data = backend.read_bytes(sidecar)
    except FileNotFoundError:
        return None
    manifest = Manifest.from_json(data, source=backend.url(sidecar))
    name = _file_name(path)
    if manifest.kind != "snapshot" or name not in manifest.files:
        raise ManifestError(f"Invalid manifest {backend.url(sidecar)}: expected a snapshot entry for {name!r}.")
    return manifest


def write_sidecar(
    backend: Backend, path: str, fmt: str, digest: Digest, *, metadata: dict[str, Any] | None = None
) -> None:
    """Write the sidecar manifest of the snapshot at `path`, with `metadata` beside the format entry."""
    manifest = Manifest(
        kind="snapshot",
        files={_file_name(path): digest},
        metadata={**(metadata or {}), "format": fmt},
        versions=library_versions(),
    )
    backend.write_bytes(path + SIDECAR_SUFFIX, manifest.to_json())


def _file_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
