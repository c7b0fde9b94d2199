"""Removing what interrupted writes leave behind, and nothing else.

A writer that is killed between its claim and its manifest leaves a
fragment: a `ckpt-<N>` or `<N>` folder with `.statefs-claim` and no
manifest. Readers ignore it, so it costs only storage. `collect_garbage`
removes such fragments, and the temporary files that the local backend
names `.<name>.<random>.tmp`, once they are older than a grace period.
Everything else stays, and the report lists what it could not classify.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import time
from typing import Any

from statefs import backends
from statefs.backends import Backend
from statefs.commit import CLAIM_NAME, list_children, read_manifest, remove_fragment
from statefs.errors import ManifestError
from statefs.integrity import TEMPORARY_FILE_NAME, is_file, unit_kind, unit_sort_key
from statefs.manifest import MANIFEST_NAME
from statefs.snapshots import SIDECAR_SUFFIX

logger = logging.getLogger(__name__)

# A claim is written before the first payload byte, so a fragment younger
# than the longest save or publish may belong to a writer still uploading.
# One hour covers a multi-gigabyte SavedModel on a link of a few MB/s, plus
# clock differences between the writer's host and the one running gc.
DEFAULT_GRACE_PERIOD = 3600.0


@dataclasses.dataclass(frozen=True)
class GarbageItem:
    """One folder or file that gc removed or kept.

    Attributes:
        url: where it is.
        kind: "fragment", "temporary file", "unit", "folder" or "file".
        reason: why it was removed or kept.
        age: seconds since it was written, where known.
    """

    url: str
    kind: str
    reason: str
    age: float | None = None


@dataclasses.dataclass
class GarbageReport:
    """The outcome of `collect_garbage`.

    Attributes:
        url: the root or unit that was collected.
        grace_period: minimum age in seconds of what was removed.
        dry_run: True if nothing was removed, and `removed` lists what
            would have been.
        removed: fragments and temporary files removed (or, in a dry run,
            that would be).
        kept: what gc found and left: fragments younger than the grace
            period, and everything it cannot classify.
        committed: committed units and snapshots with a sidecar manifest,
            left as they are.
    """

    url: str
    grace_period: float
    dry_run: bool
    removed: list[GarbageItem] = dataclasses.field(default_factory=list)
    kept: list[GarbageItem] = dataclasses.field(default_factory=list)
    committed: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-serializable data, as `statefs gc --json` prints it."""
        return {
            "url": self.url,
            "grace_period": self.grace_period,
            "dry_run": self.dry_run,
            "removed": [dataclasses.asdict(item) for item in self.removed],
            "kept": [dataclasses.asdict(item) for item in self.kept],
            "committed": list(self.committed),
        }


def collect_garbage(
    url: str,
    *,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GarbageReport:
    """Remove the leftovers of interrupted writes under a checkpoint or version root.

    `url` is a root of checkpoints, versions or snapshots, or one unit.
    Removed are, once older than `grace_period` seconds:

    - fragments: a `ckpt-<N>` or `<N>` folder with `.statefs-claim` and no
      manifest. The age comes from the time recorded in the claim, or from
      the claim object's modification time if the claim is unreadable.
    - temporary files of the local backend (`.<name>.<random>.tmp`) that a
      killed write left in the root or in a committed unit, where no
      manifest lists them. The age is their modification time.

    A committed unit's manifest and payload are never touched. Fragments
    younger than the grace period are kept and reported. So is everything
    gc cannot classify: folders and files without statefs names, a
    statefs-named folder with neither claim nor manifest, a unit with an
    invalid manifest, and a sidecar manifest without its snapshot.

    Example:

    ```python
    report = statefs.collect_garbage("s3://bucket/run-7/ckpt", dry_run=True)
    for item in report.removed:
        print("would remove", item.url)
    ```

    Args:
        url: the root or unit to clean.
        grace_period: seconds a leftover must have existed before it is
            removed, because a younger one may belong to a write still in
            progress. One hour by default.
        dry_run: list what would be removed, and remove nothing.
        storage_options: passed to the fsspec filesystem untouched.

    Raises:
        ValueError: `grace_period` is negative or not a number, or `url`
            is a file.
    """
    grace_period = _check_grace_period(grace_period)
    backend, path = backends.resolve(url, storage_options)
    backend.check(path)
    if is_file(backend, path):
        raise ValueError(
            f"Invalid URL for gc: {backend.url(path)} is a file. Pass the folder that contains it, "
            "or a checkpoint or version root."
        )
    collector = _Collector(backend, grace_period, dry_run)
    collector.collect(path)
    report = collector.report
    logger.info(
        "gc of %s: %s %d, kept %d, %d committed",
        report.url, "would remove" if dry_run else "removed", len(report.removed), len(report.kept), len(report.committed),
    )
    return report


class _Collector:
    """One gc pass over a root or a unit, which classifies each entry and then removes or keeps it."""

    def __init__(self, backend: Backend, grace_period: float, dry_run: bool):
        self.backend = backend
        self.grace_period = grace_period
        self.dry_run = dry_run
        self.now = time.time()
        self.report: GarbageReport

    def collect(self, path: str) -> None:
        self.report = GarbageReport(url=self.backend.url(path), grace_period=self.grace_period, dry_run=self.dry_run)
        is_unit = any(self.backend.exists(self.backend.join(path, name)) for name in (MANIFEST_NAME, CLAIM_NAME))
        if is_unit:
            self._collect_unit(path)
        else:
            self._collect_root(path)

    def _collect_root(self, path: str) -> None:
        for name, child in sorted(list_children(self.backend, path).items(), key=unit_sort_key):
            if unit_kind(name) is None:
                self._keep(child, "folder", "not named like a checkpoint or a version")
            else:
                self._collect_unit(child)

        files = {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: info
            for info in self.backend.list_dir(path)
            if info.get("type") == "file"
        }
        for name in sorted(files):
            self._collect_root_file(self.backend.join(path, name), name, files)

    def _collect_root_file(self, file_path: str, name: str, files: dict[str, dict[str, Any]]) -> None:
        if TEMPORARY_FILE_NAME.match(name):
            self._collect_temporary_file(file_path)
        elif name.endswith(SIDECAR_SUFFIX):
            if name[: -len(SIDECAR_SUFFIX)] not in files:
                self._keep(file_path, "file", "a sidecar manifest whose snapshot is missing")
        elif name + SIDECAR_SUFFIX in files:
            self.report.committed.append(self.backend.url(file_path))
        else:
            self._keep(file_path, "file", "not written by statefs (no sidecar manifest)")

    def _collect_unit(self, path: str) -> None:
        try:
            manifest = read_manifest(self.backend, path)
        except ManifestError:
            self._keep(path, "unit", "invalid manifest (`statefs verify` names the problem)")
            return
        if manifest is not None:
            self.report.committed.append(self.backend.url(path))
            self._collect_unlisted_files(path, set(manifest.files))
            return

        claim_path = self.backend.join(path, CLAIM_NAME)
        if not self.backend.exists(claim_path):
            self._keep(path, "folder", "named like a statefs unit but contains neither a claim nor a manifest")
            return
        age = self._claim_age(claim_path)
        if age is None:
            self._keep(path, "fragment", "age unknown: the claim records no time and the store returns no modification time")
        elif age < self.grace_period:
            self._keep(path, "fragment", "younger than the grace period, so a writer may still be running", age)
        else:
            self._remove_fragment(path, age)

    def _collect_unlisted_files(self, path: str, listed: set[str]) -> None:
        """Remove old temporary files in a committed unit, and report its other unlisted files."""
        for name in sorted(self.backend.find(path)):
            if name in listed or name in (MANIFEST_NAME, CLAIM_NAME):
                continue
            file_path = self.backend.join(path, name)
            if TEMPORARY_FILE_NAME.match(name.rsplit("/", 1)[-1]):
                self._collect_temporary_file(file_path)
            else:
                self._keep(file_path, "file", "in a committed unit but not listed in its manifest")

    def _collect_temporary_file(self, path: str) -> None:
        age = _modified_age(self.backend, path, self.now)
        if age is None:
            self._keep(path, "temporary file", "age unknown: the store returns no modification time")
        elif age < self.grace_period:
            self._keep(path, "temporary file", "younger than the grace period, so a write may still be running", age)
        else:
            if not self.dry_run:
                self.backend.delete(path)
                logger.info("Removed temporary file %s", self.backend.url(path))
            self.report.removed.append(GarbageItem(self.backend.url(path), "temporary file", "older than the grace period", age))

    def _remove_fragment(self, path: str, age: float) -> None:
        url = self.backend.url(path)
        item = GarbageItem(url, "fragment", "a claim without a manifest, older than the grace period", age)
        if self.dry_run:
            self.report.removed.append(item)
            return
        # remove_fragment reads the manifest again just before deleting, so
        # a writer that committed since the check above keeps its unit.
        if remove_fragment(self.backend, path):
            self.report.removed.append(item)
        else:
            self.report.committed.append(url)

    def _claim_age(self, claim_path: str) -> float | None:
        written = _claim_time(self.backend, claim_path)
        if written is None:
            return _modified_age(self.backend, claim_path, self.now)
        return self.now - written

    def _keep(self, path: str, kind: str, reason: str, age: float | None = None) -> None:
        self.report.kept.append(GarbageItem(self.backend.url(path), kind, reason, age))


def _claim_time(backend: Backend, claim_path: str) -> float | None:
    """Return the POSIX time a claim records, or None if it is unreadable."""
    try:
        claim = json.loads(backend.read_bytes(claim_path))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    written = claim.get("time") if isinstance(claim, dict) else None
    if isinstance(written, bool) or not isinstance(written, (int, float)) or not math.isfinite(written):
        return None
    return float(written)


def _modified_age(backend: Backend, path: str, now: float) -> float | None:
    """Return seconds since `path` was last modified, or None if the store returns no modification time."""
    # fsspec's `modified` is the portable call, because the Backend contract
    # has no method for modification times.
    backend.fs.invalidate_cache(path)
    try:
        modified = backend.fs.modified(path)
    except (NotImplementedError, OSError, KeyError):
        return None
    if modified.tzinfo is None:
        # Object stores report UTC, so a naive value must not be read as local time.
        modified = modified.replace(tzinfo=datetime.timezone.utc)
    return now - modified.timestamp()


def _check_grace_period(grace_period: Any) -> float:
    valid = (
        not isinstance(grace_period, bool)
        and isinstance(grace_period, (int, float))
        and math.isfinite(grace_period)
        and grace_period >= 0
    )
    if not valid:
        raise ValueError(
            f"grace_period must be a non-negative number of seconds. Received: grace_period={grace_period!r}"
        )
    return float(grace_period)
