"""Checking stored model state against its manifests, in place.

`verify` accepts the URLs that `statefs ls` accepts: one checkpoint or
version (a unit), a root folder of them, or a snapshot file. Each payload
file is compared with the size and CRC32C its manifest records. Sizes come
from a listing, and checksums from the listing where the store keeps a
compatible one (GCS, and S3 for single-part uploads) or from streaming the
object through a hash otherwise.
Nothing is written to local disk.

What counts as a failure, and what is only a note:

- A problem makes `VerificationReport.ok` false. Problems are a missing,
  resized or changed payload file, an invalid manifest, and a manifest entry
  that leads outside its unit. A snapshot without a sidecar manifest is one
  too, because nothing records its checksum. So are a unit URL that contains
  a claim but no manifest, and a URL where statefs finds nothing it can
  verify. The last one catches a mistyped URL, which would otherwise pass as
  an empty root.
- A note does not: uncommitted fragments under a root (readers ignore them,
  and `collect_garbage` removes them), folders and files that statefs did
  not write, and files in a unit that its manifest does not list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

from statefs import backends
from statefs.backends import Backend
from statefs.checkpoints import CHECKPOINT_NAME
from statefs.checksums import Digest, copy_stream
from statefs.commit import CLAIM_NAME, list_children, read_manifest, verify_unit
from statefs.errors import IntegrityError, ManifestError
from statefs.manifest import MANIFEST_NAME, Manifest, check_relative_path
from statefs.snapshots import SIDECAR_SUFFIX, read_sidecar
from statefs.versions import VERSION_NAME

logger = logging.getLogger(__name__)

MISSING_FILE = "missing-file"
SIZE_MISMATCH = "size-mismatch"
CHECKSUM_MISMATCH = "checksum-mismatch"
INVALID_MANIFEST = "invalid-manifest"
UNSAFE_PATH = "unsafe-path"
NO_RECORDED_CHECKSUM = "no-recorded-checksum"
NOT_COMMITTED = "not-committed"
NOTHING_TO_VERIFY = "nothing-to-verify"

# The local backend writes through a temporary file named by
# tempfile.mkstemp(prefix=".<name>.", suffix=".tmp"), whose random part is
# eight characters from [a-z0-9_]. A killed writer can leave one behind.
TEMPORARY_FILE_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason a verification failed.

    Attributes:
        kind: one of "missing-file", "size-mismatch", "checksum-mismatch",
            "invalid-manifest", "unsafe-path", "no-recorded-checksum",
            "not-committed" and "nothing-to-verify".
        url: the file, manifest or folder concerned.
        message: what is wrong, in one line, without the URL.
        expected: the value the manifest records, where one was compared.
        found: the value read from the store, or the unsafe manifest entry.
    """

    kind: str
    url: str
    message: str
    expected: Any = None
    found: Any = None

    def __str__(self) -> str:
        return f"{self.url}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Note:
    """Something verify saw and did not check, which is not a failure."""

    url: str
    message: str

    def __str__(self) -> str:
        return f"{self.url}: {self.message}"


@dataclasses.dataclass
class VerificationReport:
    """The outcome of `verify`.

    Attributes:
        url: the URL that was verified.
        units: URLs of the committed checkpoints and versions checked.
        snapshots: URLs of the snapshot files checked.
        files: payload files checked, snapshots included.
        bytes: total size of those files as their manifests record it.
        problems: every failure found, empty when all is well.
        notes: what was seen but not checked, and why.
    """

    url: str
    units: list[str] = dataclasses.field(default_factory=list)
    snapshots: list[str] = dataclasses.field(default_factory=list)
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    notes: list[Note] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-serializable data, as `statefs verify --json` prints it."""
        return {
            "url": self.url,
            "ok": self.ok,
            "units": list(self.units),
            "snapshots": list(self.snapshots),
            "files": self.files,
            "bytes": self.bytes,
            "problems": [dataclasses.asdict(problem) for problem in self.problems],
            "notes": [dataclasses.asdict(note) for note in self.notes],
        }


def verify(url: str, *, storage_options: dict[str, Any] | None = None) -> VerificationReport:
    """Check stored checkpoints, versions or snapshots against their manifests.

    `url` is one checkpoint (`.../ckpt-12`) or version (`.../3`), a root
    folder of checkpoints or versions, a folder of snapshots, or one snapshot
    file (checked against its sidecar `<file>.statefs-manifest.json`).
    Problems are collected rather than raised, so one report lists every
    damaged file.

    Example:

    ```python
    report = statefs.verify("s3://bucket/run-7/ckpt")
    if not report.ok:
        for problem in report.problems:
            print(problem)
    ```

    Raises:
        ConnectionError: the store's endpoint cannot be reached.
        ImportError: the package for the URL's protocol is not installed.
    """
    backend, path = backends.resolve(url, storage_options)
    backend.check(path)
    report = VerificationReport(url=backend.url(path))

    snapshot = _snapshot_path(backend, path)
    if snapshot is not None:
        _verify_snapshot(backend, snapshot, report)
    elif backend.exists(backend.join(path, MANIFEST_NAME)):
        _verify_unit(backend, path, report)
    elif backend.exists(backend.join(path, CLAIM_NAME)):
        report.problems.append(
            Problem(NOT_COMMITTED, report.url, "not committed: a claim without a manifest, so no reader loads it. "
                    "A writer is still running there or died.")
        )
    else:
        _verify_root(backend, path, report)

    logger.info(
        "Verified %s: %d units, %d snapshots, %d files, %d problems",
        report.url, len(report.units), len(report.snapshots), report.files, len(report.problems),
    )
    return report


def _snapshot_path(backend: Backend, path: str) -> str | None:
    """Return the snapshot that `path` names (the file itself or its sidecar), or None for a folder."""
    if path.endswith(SIDECAR_SUFFIX):
        return path[: -len(SIDECAR_SUFFIX)]
    if is_file(backend, path) or backend.exists(path + SIDECAR_SUFFIX):
        return path
    return None


def _verify_unit(backend: Backend, path: str, report: VerificationReport, *, expected_kind: str | None = None) -> None:
    """Check one unit that has a manifest, which may itself be invalid."""
    url = backend.url(path)
    try:
        manifest = read_manifest(backend, path)
    except ManifestError as error:
        report.problems.append(_manifest_problem(backend, backend.join(path, MANIFEST_NAME), error))
        return
    if manifest is None:
        # Rotation can delete the manifest between the existence check and this read.
        report.notes.append(Note(url, "not checked: the manifest was deleted during verification"))
        return

    report.units.append(url)
    report.files += len(manifest.files)
    report.bytes += manifest.total_size()
    if expected_kind is not None and manifest.kind != expected_kind:
        report.notes.append(
            Note(url, f"its manifest is of kind {manifest.kind!r}, not {expected_kind!r}, so the "
                 f"{expected_kind} listing of this root does not include it")
        )

    # verify_unit reports a missing file without its URL as an attribute, so
    # this listing finds missing files, and verify_unit checks the others.
    stored = backend.find(path)
    present = {name: digest for name, digest in manifest.files.items() if name in stored}
    for name in sorted(set(manifest.files) - set(present)):
        report.problems.append(
            Problem(MISSING_FILE, backend.url(backend.join(path, name)), "missing: listed in the manifest but not found")
        )
    for error in verify_unit(backend, path, Manifest(kind=manifest.kind, files=present)):
        report.problems.append(_stored_file_problem(error, url))
    _note_unlisted_files(backend, path, stored, manifest, report)


def _note_unlisted_files(
    backend: Backend, path: str, stored: dict[str, Any], manifest: Manifest, report: VerificationReport
) -> None:
    for name in sorted(set(stored) - set(manifest.files) - {MANIFEST_NAME, CLAIM_NAME}):
        base_name = name.rsplit("/", 1)[-1]
        if TEMPORARY_FILE_NAME.match(base_name):
            message = "not checked: a temporary file of an interrupted local write, which `statefs gc` removes"
        else:
            message = "not checked: the manifest does not list it, so no load reads it"
        report.notes.append(Note(backend.url(backend.join(path, name)), message))


def _verify_root(backend: Backend, path: str, report: VerificationReport) -> None:
    """Check every checkpoint, version and snapshot directly under `path`."""
    for name, child in sorted(list_children(backend, path).items(), key=unit_sort_key):
        expected_kind = unit_kind(name)
        if expected_kind is None:
            report.notes.append(Note(backend.url(child), "not checked: not named like a checkpoint or a version"))
        elif backend.exists(backend.join(child, MANIFEST_NAME)):
            _verify_unit(backend, child, report, expected_kind=expected_kind)
        elif backend.exists(backend.join(child, CLAIM_NAME)):
            report.notes.append(
                Note(backend.url(child), "not committed: a claim without a manifest, which readers ignore and "
                     "`statefs gc` removes once it is older than the grace period")
            )
        else:
            report.notes.append(
                Note(backend.url(child), f"not checked: named like a {expected_kind} but contains neither "
                     "a claim nor a manifest, so statefs did not write it")
            )

    _verify_root_files(backend, path, report)
    if not (report.units or report.snapshots or report.problems):
        report.problems.append(
            Problem(NOTHING_TO_VERIFY, report.url, "nothing to verify: no committed checkpoint, version or "
                    "snapshot with a sidecar manifest here. Check the URL.")
        )


def _verify_root_files(backend: Backend, path: str, report: VerificationReport) -> None:
    files = {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: info
        for info in backend.list_dir(path)
        if info.get("type") == "file"
    }
    for name in sorted(files):
        file_path = backend.join(path, name)
        if name.endswith(SIDECAR_SUFFIX):
            if name[: -len(SIDECAR_SUFFIX)] not in files:
                _verify_snapshot(backend, file_path[: -len(SIDECAR_SUFFIX)], report)
        elif name + SIDECAR_SUFFIX in files:
            _verify_snapshot(backend, file_path, report, info=files[name])
        elif TEMPORARY_FILE_NAME.match(name):
            report.notes.append(
                Note(backend.url(file_path), "not checked: a temporary file of an interrupted local write, "
                     "which `statefs gc` removes")
            )
        else:
            report.notes.append(Note(backend.url(file_path), "not checked: no sidecar manifest records its checksum"))


def _verify_snapshot(backend: Backend, path: str, report: VerificationReport, *, info: dict[str, Any] | None = None) -> None:
    """Check one snapshot file against its sidecar manifest."""
    url = backend.url(path)
    sidecar_name = path.rstrip("/").rsplit("/", 1)[-1] + SIDECAR_SUFFIX
    try:
        expected = read_sidecar(backend, path)
    except ManifestError as error:
        report.problems.append(_manifest_problem(backend, path + SIDECAR_SUFFIX, error))
        return
    if expected is None:
        # Only a snapshot requested by URL gets here, because a root reports
        # a file without a sidecar as a note.
        report.problems.append(
            Problem(NO_RECORDED_CHECKSUM, url, f"no recorded checksum: there is no sidecar manifest "
                    f"{sidecar_name} beside it, so it cannot be verified. statefs.save_snapshot writes one.")
        )
        return

    report.snapshots.append(url)
    report.files += 1
    report.bytes += expected.size
    if info is None:
        try:
            info = backend.info(path)
        except FileNotFoundError:
            report.problems.append(
                Problem(MISSING_FILE, url, f"missing: the sidecar manifest {sidecar_name} records it but it is not found")
            )
            return
    error = _check_stored_file(backend, path, info, expected)
    if error is not None:
        report.problems.append(_stored_file_problem(error, url))


def _check_stored_file(backend: Backend, path: str, info: dict[str, Any], expected: Digest) -> IntegrityError | None:
    """Compare one stored file with its recorded digest, as verify_unit does for the files of a unit."""
    url = backend.url(path)
    if info.get("size") != expected.size:
        return IntegrityError(url, "size", expected.size, info.get("size"))
    checksum = backend.native_checksum(info)
    if checksum is None:
        with backend.open_read(path) as reader:
            checksum = copy_stream(reader).crc32c
    if checksum != expected.crc32c:
        return IntegrityError(url, "crc32c", expected.crc32c, checksum)
    return None


def _stored_file_problem(error: IntegrityError | FileNotFoundError, unit_url: str) -> Problem:
    if isinstance(error, IntegrityError):
        kind = SIZE_MISMATCH if error.field == "size" else CHECKSUM_MISMATCH
        what = "size mismatch" if error.field == "size" else "checksum mismatch"
        return Problem(
            kind,
            error.url,
            f"{what}: {error.field} is {error.found!r}, expected {error.expected!r}",
            expected=error.expected,
            found=error.found,
        )
    # A file removed between the listing above and verify_unit's own listing.
    return Problem(MISSING_FILE, unit_url, f"missing: {_one_line(error)}")


def _manifest_problem(backend: Backend, manifest_path: str, error: ManifestError) -> Problem:
    """Describe an invalid manifest, singling out entries that lead outside their unit."""
    url = backend.url(manifest_path)
    unsafe = _unsafe_entries(backend, manifest_path)
    if unsafe:
        return Problem(
            UNSAFE_PATH,
            url,
            f"unsafe path: the manifest lists {unsafe[0]!r}, which is not a plain relative path inside "
            "the unit, so every load rejects this manifest",
            found=unsafe[0],
        )
    detail = _one_line(error).removeprefix(f"Invalid manifest {url}: ")
    return Problem(INVALID_MANIFEST, url, f"invalid manifest: {detail}")


def _unsafe_entries(backend: Backend, manifest_path: str) -> list[str]:
    """Return the file entries of a manifest that check_relative_path rejects."""
    try:
        document = json.loads(backend.read_bytes(manifest_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict):
        return []
    unsafe = []
    for entry in files:
        try:
            check_relative_path(entry)
        except ManifestError:
            unsafe.append(entry)
    return unsafe


def unit_sort_key(item: tuple[str, str]) -> tuple[int, str]:
    """Sort key that puts ckpt-2 before ckpt-10 and version 2 before version 10."""
    digits = item[0].removeprefix("ckpt-")
    return (int(digits), item[0]) if digits.isdigit() else (-1, item[0])


def unit_kind(name: str) -> str | None:
    """Return "checkpoint" or "version" for a folder name that statefs gives units, else None."""
    if CHECKPOINT_NAME.match(name):
        return "checkpoint"
    if VERSION_NAME.match(name):
        return "version"
    return None


def is_file(backend: Backend, path: str) -> bool:
    """Return whether `path` is a file, so False for a folder or a missing path."""
    try:
        return backend.info(path).get("type") == "file"
    except FileNotFoundError:
        return False


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
