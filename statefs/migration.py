"""Copying model state between stores, checked at the destination."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from statefs import backends
from statefs.backends import Backend
from statefs.checksums import Digest, copy_stream
from statefs.checkpoints import CHECKPOINT_NAME
from statefs.commit import (
    UnitWriter,
    check_digest,
    committed_manifest_or_none,
    list_children,
    read_manifest,
    staging_folder,
    verify_unit,
)
from statefs.errors import UnitExistsError
from statefs.manifest import Manifest
from statefs.snapshots import SIDECAR_SUFFIX, download_snapshot, read_sidecar_manifest, upload_snapshot, write_sidecar
from statefs.versions import SAVED_MODEL_LAST, VERSION_NAME

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CopiedItem:
    """One snapshot or unit that a migration handled."""

    kind: str
    source: str
    destination: str
    files: int
    bytes: int
    seconds: float
    action: str  # "copied", "converted" or "already present"


@dataclasses.dataclass
class MigrationReport:
    """The items a migration copied or found already present, and the units it skipped."""

    items: list[CopiedItem] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)


def migrate(
    src: str,
    dst: str,
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
) -> MigrationReport:
    """Copy a snapshot, a version, a version root or a checkpoint root from `src` to `dst`.

    Files are streamed byte for byte, hashed on the way, and checked at the
    destination: sizes from a listing, CRC32C from the store where it keeps
    one and by reading the copy back otherwise. A copied unit is committed by
    the same rule as a new one, its manifest written last, so it is valid
    where it lands. A snapshot whose destination suffix differs (`.h5` to
    `.keras`) is converted through Keras. A destination without a snapshot
    suffix is a folder, and the file keeps its name there.

    Running the same migration again copies only what is missing: a unit
    already committed at the destination with the same files is left as is.

    Example:

    ```python
    statefs.migrate("s3://bucket/models/digits", "gs://other/models/digits")
    statefs.migrate("s3://bucket/snap/digits.h5", "/tmp/export/digits.keras")
    ```

    Raises:
        FileNotFoundError: `src` contains nothing statefs can migrate.
        UnitExistsError: a different unit is already committed at the destination.
        IntegrityError: a source file differs from its manifest, or the copy
            differs from the source.
    """
    source, src_path = backends.resolve(src, src_storage_options)
    target, dst_path = backends.resolve(dst, dst_storage_options)
    source.check(src_path)
    target.check(dst_path)
    report = MigrationReport()

    if _is_file(source, src_path):
        report.items.append(_migrate_snapshot(source, src_path, target, _snapshot_target(target, dst_path, src_path)))
        return report

    manifest = read_manifest(source, src_path)
    if manifest is not None:
        report.items.append(copy_unit(source, src_path, manifest, target, dst_path))
        return report

    _migrate_root(source, src_path, target, dst_path, report)
    if not report.items:
        raise FileNotFoundError(
            f"Nothing to migrate at {source.url(src_path)}: expected a snapshot file, a committed unit "
            "(a folder with a statefs manifest), or a folder of committed versions or checkpoints."
        )
    return report


def copy_unit(source: Backend, src_path: str, manifest: Manifest, target: Backend, dst_path: str) -> CopiedItem:
    """Copy one committed unit, commit it at the destination, and verify the copy."""
    started = time.perf_counter()
    existing = read_manifest(target, dst_path)
    if existing is not None:
        if existing.files != manifest.files:
            raise UnitExistsError(
                f"{target.url(dst_path)} already contains a different committed {existing.kind}, "
                "and statefs never overwrites a unit. Choose another destination."
            )
        return _item(manifest.kind, source.url(src_path), target.url(dst_path), manifest, started, "already present")

    writer = UnitWriter(target, dst_path, kind=manifest.kind, metadata=manifest.metadata, versions=manifest.versions)
    names = sorted(manifest.files, key=lambda name: (name.rsplit("/", 1)[-1] in SAVED_MODEL_LAST, name))
    with writer.claimed():
        for relative_path in names:
            writer.copy_file(source, source.join(src_path, relative_path), relative_path, manifest.files[relative_path])
        writer.commit()
    problems = verify_unit(target, dst_path, manifest)
    if problems:
        raise problems[0]
    return _item(manifest.kind, source.url(src_path), target.url(dst_path), manifest, started, "copied")


def _migrate_root(source: Backend, src_path: str, target: Backend, dst_path: str, report: MigrationReport) -> None:
    """Copy every committed version or checkpoint under a root folder."""
    children = list_children(source, src_path).items()
    # Numeric order, so ckpt-57 is copied before ckpt-114.
    for name, path in sorted(children, key=lambda child: (len(child[0]), child[0])):
        if not (VERSION_NAME.match(name) or CHECKPOINT_NAME.match(name)):
            continue
        manifest = committed_manifest_or_none(source, path)
        if manifest is None:
            report.skipped.append(f"{source.url(path)}: not committed")
            logger.warning("Skipping %s: not committed", source.url(path))
            continue
        report.items.append(copy_unit(source, path, manifest, target, target.join(dst_path, name)))


def _migrate_snapshot(source: Backend, src_path: str, target: Backend, dst_path: str) -> CopiedItem:
    from statefs import keras_io

    started = time.perf_counter()
    src_format = keras_io.snapshot_format(src_path)
    dst_format = keras_io.snapshot_format(dst_path)
    if src_format == dst_format:
        recorded = read_sidecar_manifest(source, src_path)
        digest = _copy_snapshot(source, src_path, target, dst_path, recorded)
        # The metadata travels too, so a ModelCheckpoint at the destination still recognises its files.
        metadata = dict(recorded.metadata) if recorded is not None else None
        write_sidecar(target, dst_path, dst_format, digest, metadata=metadata)
        action = "copied"
    else:
        digest = _convert_snapshot(source, src_path, target, dst_path)
        action = "converted"
    _verify_file(target, dst_path, digest)
    return CopiedItem(
        kind="snapshot",
        source=source.url(src_path),
        destination=target.url(dst_path),
        files=1,
        bytes=digest.size,
        seconds=time.perf_counter() - started,
        action=action,
    )


def _copy_snapshot(source: Backend, src_path: str, target: Backend, dst_path: str, recorded: Manifest | None) -> Digest:
    name = src_path.rstrip("/").rsplit("/", 1)[-1]
    expected = recorded.files[name] if recorded is not None else None
    with source.open_read(src_path) as reader, target.open_write(dst_path) as writer:
        digest = copy_stream(reader, writer)
        # Checked before the write block ends, so a damaged source makes
        # open_write discard the copy instead of leaving it without a sidecar.
        if expected is not None:
            check_digest(source.url(src_path), expected, digest)
    return digest


def _convert_snapshot(source: Backend, src_path: str, target: Backend, dst_path: str) -> Digest:
    from statefs import keras_io

    if keras_io.snapshot_format(src_path) == "weights":
        raise ValueError(
            f"Cannot convert {source.url(src_path)} to {target.url(dst_path)}: a weights-only file "
            "does not describe the model. Load it into a model and call save_snapshot instead."
        )
    with staging_folder("convert") as staging:
        local_source = os.path.join(staging, "source" + keras_io.snapshot_suffix(src_path))
        download_snapshot(source, src_path, local_source)
        model = keras_io.load_model_file(local_source, source=source.url(src_path))
        local_target = os.path.join(staging, "target" + keras_io.snapshot_suffix(dst_path))
        keras_io.save_model_file(model, local_target)
        snapshot = upload_snapshot(local_target, target, dst_path, keras_io.snapshot_format(dst_path))
    return Digest(size=snapshot.size, crc32c=snapshot.crc32c)


def _verify_file(backend: Backend, path: str, expected: Digest) -> None:
    """Check one stored file against `expected`, without a download where the store allows."""
    info = backend.info(path)
    checksum = backend.native_checksum(info)
    if checksum is None or info.get("size") != expected.size:
        with backend.open_read(path) as reader:
            found = copy_stream(reader)
    else:
        found = Digest(size=info["size"], crc32c=checksum)
    check_digest(backend.url(path), expected, found)


def _snapshot_target(target: Backend, dst_path: str, src_path: str) -> str:
    """Return the destination file: `dst_path` itself, or the source's name inside that folder."""
    from statefs import keras_io

    try:
        keras_io.snapshot_format(dst_path)
    except ValueError:
        return target.join(dst_path, src_path.rstrip("/").rsplit("/", 1)[-1])
    return dst_path


def _is_file(backend: Backend, path: str) -> bool:
    if path.endswith(SIDECAR_SUFFIX):
        return False
    try:
        return backend.info(path).get("type") == "file"
    except FileNotFoundError:
        return False


def _item(kind: str, source: str, destination: str, manifest: Manifest, started: float, action: str) -> CopiedItem:
    return CopiedItem(
        kind=kind,
        source=source,
        destination=destination,
        files=len(manifest.files),
        bytes=manifest.total_size(),
        seconds=time.perf_counter() - started,
        action=action,
    )
