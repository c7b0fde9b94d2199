"""The manifest: the one object whose presence makes a unit committed.

A unit (a checkpoint step, a model version, a migrated copy) is a prefix with
payload files and `statefs-manifest.json`. The manifest lists every payload
file with its size and CRC32C, names the kind of unit, and carries the
caller's metadata and the library versions that wrote it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import posixpath
from typing import Any

from statefs.checksums import ALGORITHM, Digest
from statefs.errors import ManifestError

MANIFEST_NAME = "statefs-manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Manifest:
    """The contents of a committed unit.

    Attributes:
        kind: "checkpoint" or "version".
        files: payload files by path relative to the unit, each with its
            size and CRC32C.
        metadata: the caller's data: step, epoch and metrics of a
            checkpoint, user metadata of a version.
        created: UTC time of the commit, ISO 8601.
        versions: library versions that wrote the payload.
    """

    kind: str
    files: dict[str, Digest]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def total_size(self) -> int:
        return sum(digest.size for digest in self.files.values())

    def to_json(self) -> bytes:
        document = {
            "format_version": self.format_version,
            "kind": self.kind,
            "created": self.created or utc_now(),
            "checksum_algorithm": ALGORITHM,
            "files": {
                path: {"size": digest.size, "crc32c": digest.crc32c}
                for path, digest in sorted(self.files.items())
            },
            "metadata": self.metadata,
            "versions": self.versions,
        }
        return json.dumps(document, indent=2, sort_keys=True, default=_json_default).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "manifest") -> Manifest:
        """Parse and validate a manifest; raise ManifestError naming `source` if it is invalid."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"Invalid manifest {source}: not JSON ({error}).") from None
        if not isinstance(document, dict):
            raise ManifestError(f"Invalid manifest {source}: expected a JSON object.")
        _require(document, "format_version", int, source)
        if document["format_version"] > FORMAT_VERSION:
            raise ManifestError(
                f"Manifest {source} has format version {document['format_version']}, "
                f"newer than this statefs reads ({FORMAT_VERSION}). Upgrade statefs."
            )
        _require(document, "kind", str, source)
        _require(document, "files", dict, source)
        for field, expected_type in (("metadata", dict), ("versions", dict), ("created", str)):
            if document.get(field) is not None:
                _require(document, field, expected_type, source)
        return cls(
            kind=document["kind"],
            files={
                check_relative_path(path, source): _parse_digest(entry, path, source)
                for path, entry in document["files"].items()
            },
            metadata=document.get("metadata") or {},
            created=document.get("created", ""),
            versions=document.get("versions") or {},
            format_version=document["format_version"],
        )


def check_relative_path(path: str, source: str = "manifest") -> str:
    """Return `path` if it stays inside its unit; raise ManifestError otherwise.

    A manifest comes from storage that anyone with write access can change,
    so a path with `..`, a leading slash or a drive must never reach a
    download that joins it to a local folder.
    """
    normalized = posixpath.normpath(path) if path else ""
    unsafe = (
        not path
        or "\\" in path
        or path.startswith("/")
        or (len(path) > 1 and path[1] == ":")
        or normalized != path
        or normalized in (".", "..")
        or normalized.startswith("../")
    )
    if unsafe:
        raise ManifestError(
            f"Invalid manifest {source}: file path {path!r} is not a plain relative path "
            "inside the unit."
        )
    return path


def _parse_digest(entry: Any, path: str, source: str) -> Digest:
    if (
        not isinstance(entry, dict)
        or not _is_integer(entry.get("size"))
        or entry["size"] < 0
        or not isinstance(entry.get("crc32c"), str)
    ):
        raise ManifestError(
            f"Invalid manifest {source}: entry for {path!r} must have an integer 'size' "
            f"and a string 'crc32c'. Received: {entry!r}"
        )
    return Digest(size=entry["size"], crc32c=entry["crc32c"])


def _is_integer(value: Any) -> bool:
    # JSON true and false load as bool, which is a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool)


def _require(document: dict, field: str, expected_type: type, source: str) -> None:
    value = document.get(field)
    valid = _is_integer(value) if expected_type is int else isinstance(value, expected_type)
    if not valid:
        raise ManifestError(
            f"Invalid manifest {source}: field {field!r} must be {expected_type.__name__}. "
            f"Received: {value!r}"
        )


def utc_now() -> str:
    # Milliseconds, so that saves made within one second still sort in order.
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _json_default(value: Any) -> Any:
    """Turn NumPy scalars and similar metric values into JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Metadata value {value!r} of type {type(value).__name__} is not JSON serializable.")
