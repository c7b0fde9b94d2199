"""The manifest: its JSON form, validation of what storage returns, and safe paths."""

from __future__ import annotations

import datetime
import json
import pickle

import numpy as np
import pytest

from statefs.checksums import Digest, digest_bytes
from statefs.errors import IntegrityError, ManifestError
from statefs.manifest import FORMAT_VERSION, Manifest, check_relative_path

SOURCE = "memory://root/ckpt-3/statefs-manifest.json"


def valid_document() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        "created": "2024-05-01T12:00:00+00:00",
        "checksum_algorithm": "crc32c",
        "files": {"checkpoint.weights.h5": {"size": 12, "crc32c": "AAAAAA=="}},
        "metadata": {"step": 3},
        "versions": {"statefs": "0.1.0"},
    }


def encoded(document) -> bytes:
    return json.dumps(document).encode()


def test_manifest_round_trips_through_json():
    manifest = Manifest(
        kind="version",
        files={
            "model.keras": digest_bytes(b"model bytes"),
            "saved_model/variables/variables.index": Digest(size=0, crc32c="AAAAAA=="),
        },
        metadata={"val_accuracy": 0.97, "tags": ["baseline"], "nested": {"lr": 0.001}},
        versions={"statefs": "0.1.0", "keras": "3.15.1"},
    )

    parsed = Manifest.from_json(manifest.to_json(), source=SOURCE)

    assert parsed.kind == manifest.kind
    assert parsed.files == manifest.files
    assert parsed.metadata == manifest.metadata
    assert parsed.versions == manifest.versions
    assert parsed.format_version == FORMAT_VERSION
    assert parsed.total_size() == len(b"model bytes")


def test_manifest_records_creation_time_in_utc():
    parsed = Manifest.from_json(Manifest(kind="checkpoint", files={}).to_json())

    created = datetime.datetime.fromisoformat(parsed.created)
    assert created.utcoffset() == datetime.timedelta(0)


def test_manifest_keeps_given_creation_time():
    manifest = Manifest(kind="checkpoint", files={}, created="2024-05-01T12:00:00+00:00")

    assert Manifest.from_json(manifest.to_json()).created == "2024-05-01T12:00:00+00:00"


def test_valid_document_parses():
    parsed = Manifest.from_json(encoded(valid_document()), source=SOURCE)

    assert parsed.files == {"checkpoint.weights.h5": Digest(size=12, crc32c="AAAAAA==")}
    assert parsed.metadata == {"step": 3}


def test_numpy_scalars_in_metadata_serialize():
    metadata = {
        "loss": np.float32(0.25),
        "accuracy": np.float64(0.875),
        "step": np.int64(12),
        "best": np.bool_(True),
    }

    parsed = Manifest.from_json(Manifest(kind="checkpoint", files={}, metadata=metadata).to_json())

    assert parsed.metadata == {"loss": 0.25, "accuracy": 0.875, "step": 12, "best": True}
    assert type(parsed.metadata["step"]) is int
    assert type(parsed.metadata["loss"]) is float


def test_unserializable_metadata_names_its_type():
    manifest = Manifest(kind="checkpoint", files={}, metadata={"callback": object()})

    with pytest.raises(TypeError, match="object"):
        manifest.to_json()


# Invalid documents. A manifest comes from storage, so each of these must be
# a ManifestError that names the source, never a KeyError or AttributeError.


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xfe\xfd", b"{\"format_version\": 1,", b""],
    ids=["binary", "invalid-utf8", "truncated-json", "empty"],
)
def test_garbage_bytes_raise_manifest_error(data):
    with pytest.raises(ManifestError, match="not JSON") as raised:
        Manifest.from_json(data, source=SOURCE)
    assert SOURCE in str(raised.value)


@pytest.mark.parametrize("document", [[], [valid_document()], "checkpoint", 1, None])
def test_non_object_json_raises_manifest_error(document):
    with pytest.raises(ManifestError, match="expected a JSON object") as raised:
        Manifest.from_json(encoded(document), source=SOURCE)
    assert SOURCE in str(raised.value)


@pytest.mark.parametrize("field", ["format_version", "kind", "files"])
def test_missing_field_raises_manifest_error(field):
    document = valid_document()
    del document[field]

    with pytest.raises(ManifestError, match=repr(field)) as raised:
        Manifest.from_json(encoded(document), source=SOURCE)
    assert SOURCE in str(raised.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("format_version", "1"),
        ("format_version", 1.0),
        ("format_version", True),
        ("kind", 3),
        ("kind", None),
        ("files", ["checkpoint.weights.h5"]),
        ("metadata", ["step", 3]),
        ("metadata", "step=3"),
        ("versions", ["statefs"]),
        ("created", 1714564800),
    ],
)
def test_wrong_field_type_raises_manifest_error(field, value):
    document = valid_document()
    document[field] = value

    with pytest.raises(ManifestError, match=repr(field)) as raised:
        Manifest.from_json(encoded(document), source=SOURCE)
    assert "Received" in str(raised.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"size": "12", "crc32c": "AAAAAA=="},
        {"size": 12.0, "crc32c": "AAAAAA=="},
        {"size": True, "crc32c": "AAAAAA=="},
        {"size": -1, "crc32c": "AAAAAA=="},
        {"size": 12, "crc32c": 0},
        {"size": 12},
        {"crc32c": "AAAAAA=="},
        [12, "AAAAAA=="],
        None,
    ],
)
def test_invalid_file_entry_raises_manifest_error(entry):
    document = valid_document()
    document["files"] = {"checkpoint.weights.h5": entry}

    with pytest.raises(ManifestError, match="checkpoint.weights.h5") as raised:
        Manifest.from_json(encoded(document), source=SOURCE)
    assert "Received" in str(raised.value)


def test_newer_format_version_asks_for_upgrade():
    document = valid_document()
    document["format_version"] = FORMAT_VERSION + 1

    with pytest.raises(ManifestError, match="Upgrade statefs") as raised:
        Manifest.from_json(encoded(document), source=SOURCE)
    assert f"format version {FORMAT_VERSION + 1}" in str(raised.value)
    assert SOURCE in str(raised.value)


def test_unsafe_path_in_document_raises_manifest_error():
    document = valid_document()
    document["files"] = {"../outside.h5": {"size": 1, "crc32c": "AAAAAA=="}}

    with pytest.raises(ManifestError, match="outside.h5"):
        Manifest.from_json(encoded(document), source=SOURCE)


# Paths inside a unit.

UNSAFE_PATHS = [
    "../x",
    "..",
    "/etc/passwd",
    "a/../../b",
    "a/../b",
    "C:\\x",
    "C:x",
    "C:/x",
    "a\\b",
    "",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    ".",
]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_check_relative_path_rejects_unsafe_path(path):
    with pytest.raises(ManifestError, match="not a plain relative path") as raised:
        check_relative_path(path, SOURCE)
    assert repr(path) in str(raised.value)


@pytest.mark.parametrize(
    "path",
    ["checkpoint.weights.h5", "saved_model/variables/variables.index", ".statefs-claim", "a..b", "..hidden"],
)
def test_check_relative_path_accepts_plain_path(path):
    assert check_relative_path(path, SOURCE) == path


def test_integrity_error_survives_pickling():
    error = IntegrityError("s3://bucket/unit/a.bin", "crc32c", "AAAAAA==", "BBBBBB==")

    copy = pickle.loads(pickle.dumps(error))

    assert str(copy) == str(error)
    assert (copy.url, copy.field, copy.expected, copy.found) == (error.url, error.field, error.expected, error.found)
