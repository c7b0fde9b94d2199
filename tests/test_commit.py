"""The commit protocol on every backend, and what CheckpointManager builds on it.

A unit is committed if and only if its manifest exists and parses. Checks
that look at the store go through a backend on a new filesystem instance
(`fresh_backend`), so no listing cache of the writer can hide a mistake.
"""

from __future__ import annotations

import io
import os

import pytest

import statefs
from conftest import build_model, make_store
from statefs import backends
from statefs.checksums import digest_bytes
from statefs.commit import (
    CLAIM_NAME,
    UnitWriter,
    delete_unit,
    download_unit,
    read_manifest,
    remove_fragment,
    verify_unit,
)
from statefs.errors import IntegrityError, ManifestError, UnitExistsError
from statefs.manifest import MANIFEST_NAME, Manifest

PAYLOAD = {
    "checkpoint.weights.h5": bytes(range(256)) * 40,
    "assets/vocabulary.txt": b"alpha\nbeta\n",
}
WEIGHTS = "checkpoint.weights.h5"
GCS_DOES_NOT_ENFORCE_PRECONDITIONS = (
    "gcp-storage-emulator ignores ifGenerationMatch=0, so a second exclusive create succeeds "
    "there; real GCS rejects it."
)


def root_backend(store):
    return backends.resolve(store.url(), store.storage_options)


def fresh_backend(store):
    """Return a backend on a new filesystem instance, sharing no cache with the writer."""
    fs = store.fs()
    return backends.backend_class(fs.protocol)(fs)


def stage_payload(folder, payload=PAYLOAD) -> dict[str, str]:
    """Write `payload` under a local folder and return {relative path: local path}."""
    local = {}
    for relative_path, data in payload.items():
        target = folder / relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        local[relative_path] = str(target)
    return local


def start_unit(backend, prefix, tmp_path, *, kind="checkpoint", metadata=None) -> UnitWriter:
    """Claim a unit and upload the payload, without committing it."""
    writer = UnitWriter(backend, prefix, kind=kind, metadata=metadata)
    writer.claim()
    for relative_path, local_path in stage_payload(tmp_path / "payload").items():
        writer.put_file(local_path, relative_path)
    return writer


def commit_unit(backend, prefix, tmp_path, **kwargs) -> Manifest:
    return start_unit(backend, prefix, tmp_path, **kwargs).commit()


def stored_names(store, *parts) -> list[str]:
    fs = store.fs()
    try:
        return sorted(fs.find(store.path(*parts)))
    except FileNotFoundError:
        return []


def replace_stored_file(store, data, *parts) -> None:
    """Overwrite one stored object from outside statefs, as damage or another tool would."""
    store.fs().pipe_file(store.path(*parts), data)


def flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


# Committing.


def test_unit_invisible_until_commit(store, tmp_path):
    backend, root = root_backend(store)
    writer = start_unit(backend, backend.join(root, "unit"), tmp_path)

    assert read_manifest(fresh_backend(store), store.path("unit")) is None

    writer.commit()

    manifest = read_manifest(fresh_backend(store), store.path("unit"))
    assert manifest is not None
    assert manifest.files == {path: digest_bytes(data) for path, data in PAYLOAD.items()}


def test_commit_writes_manifest_last(store, tmp_path):
    backend, root = root_backend(store)
    writer = start_unit(backend, backend.join(root, "unit"), tmp_path)

    assert store.path("unit", MANIFEST_NAME) not in stored_names(store, "unit")
    writer.commit()
    assert store.path("unit", MANIFEST_NAME) in stored_names(store, "unit")


def test_commit_records_kind_metadata_and_versions(store, tmp_path):
    backend, root = root_backend(store)
    commit_unit(backend, backend.join(root, "unit"), tmp_path, kind="version", metadata={"val_accuracy": 0.9})

    manifest = read_manifest(fresh_backend(store), store.path("unit"))

    assert manifest.kind == "version"
    assert manifest.metadata == {"val_accuracy": 0.9}
    assert manifest.versions["statefs"] == statefs.__version__


def test_claim_on_unfinished_unit_raises(store, tmp_path):
    if store.backend == "gs":
        pytest.skip(GCS_DOES_NOT_ENFORCE_PRECONDITIONS)
    backend, root = root_backend(store)
    start_unit(backend, backend.join(root, "unit"), tmp_path)

    with pytest.raises(UnitExistsError, match="unfinished write"):
        UnitWriter(backend, backend.join(root, "unit"), kind="checkpoint").claim()


def test_claim_on_committed_unit_raises(store, tmp_path):
    backend, root = root_backend(store)
    commit_unit(backend, backend.join(root, "unit"), tmp_path)

    with pytest.raises(UnitExistsError, match="already committed"):
        UnitWriter(backend, backend.join(root, "unit"), kind="checkpoint").claim()


def test_claim_keeps_committed_unit_intact(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)

    with pytest.raises(UnitExistsError):
        UnitWriter(backend, backend.join(root, "unit"), kind="checkpoint").claim()

    assert read_manifest(fresh_backend(store), store.path("unit")).files == manifest.files


@pytest.mark.parametrize("relative_path", ["../escape.bin", "a/../../escape.bin", "/escape.bin"])
def test_put_file_rejects_path_outside_unit(store, tmp_path, relative_path):
    backend, root = root_backend(store)
    writer = UnitWriter(backend, backend.join(root, "unit"), kind="checkpoint")
    writer.claim()
    local = stage_payload(tmp_path / "payload", {"data.bin": b"data"})["data.bin"]

    with pytest.raises(ManifestError, match="escape.bin"):
        writer.put_file(local, relative_path)

    assert stored_names(store) == [store.path("unit", CLAIM_NAME)]


# Downloading.


def test_download_unit_writes_every_file(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    target = tmp_path / "download"

    download_unit(fresh_backend(store), store.path("unit"), manifest, str(target))

    for relative_path, data in PAYLOAD.items():
        assert (target / relative_path).read_bytes() == data


def test_download_unit_detects_flipped_byte(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, flip_first_byte(PAYLOAD[WEIGHTS]), "unit", WEIGHTS)

    with pytest.raises(IntegrityError) as raised:
        download_unit(fresh_backend(store), store.path("unit"), manifest, str(tmp_path / "download"))

    error = raised.value
    expected = digest_bytes(PAYLOAD[WEIGHTS]).crc32c
    found = digest_bytes(flip_first_byte(PAYLOAD[WEIGHTS])).crc32c
    assert error.field == "crc32c"
    assert error.url.endswith(f"unit/{WEIGHTS}")
    assert (error.expected, error.found) == (expected, found)
    assert expected in str(error)
    assert found in str(error)
    assert WEIGHTS in str(error)


def test_download_unit_detects_truncated_file(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, PAYLOAD[WEIGHTS][:100], "unit", WEIGHTS)

    with pytest.raises(IntegrityError) as raised:
        download_unit(fresh_backend(store), store.path("unit"), manifest, str(tmp_path / "download"))

    error = raised.value
    assert error.field == "size"
    assert (error.expected, error.found) == (len(PAYLOAD[WEIGHTS]), 100)
    assert f"{len(PAYLOAD[WEIGHTS])}" in str(error)
    assert WEIGHTS in str(error)


def test_download_unit_detects_missing_file(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    store.fs().rm_file(store.path("unit", WEIGHTS))

    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        download_unit(fresh_backend(store), store.path("unit"), manifest, str(tmp_path / "download"))


def test_download_unit_without_checksums_skips_crc(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, flip_first_byte(PAYLOAD[WEIGHTS]), "unit", WEIGHTS)
    target = tmp_path / "download"

    download_unit(fresh_backend(store), store.path("unit"), manifest, str(target), verify_checksums=False)

    assert (target / WEIGHTS).read_bytes() == flip_first_byte(PAYLOAD[WEIGHTS])


def test_download_unit_without_checksums_still_checks_size(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, PAYLOAD[WEIGHTS][:-1], "unit", WEIGHTS)

    with pytest.raises(IntegrityError, match="size"):
        download_unit(fresh_backend(store), store.path("unit"), manifest, str(tmp_path / "download"), verify_checksums=False)


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(parent, name), folder) for parent, _, names in os.walk(folder) for name in names)


@pytest.mark.parametrize("entry", ["../escape.bin", "a/../../escape.bin", "ABSOLUTE"])
def test_download_unit_never_writes_outside_target(store, tmp_path, monkeypatch, entry):
    downloads = tmp_path / "downloads"
    target = downloads / "target"
    target.mkdir(parents=True)
    if entry == "ABSOLUTE":
        entry = str(downloads / "escape.bin")
    manifest = Manifest(kind="checkpoint", files={entry: digest_bytes(b"planted")})
    backend, root = root_backend(store)
    # Every read returns the planted bytes, so only the path check keeps the
    # manifest entry from creating a file outside the target.
    monkeypatch.setattr(backend, "open_read", lambda path: io.BytesIO(b"planted"))

    with pytest.raises(ManifestError, match="escape.bin"):
        download_unit(backend, backend.join(root, "unit"), manifest, str(target))

    assert files_under(downloads) == []
    assert not (tmp_path / "escape.bin").exists()


# Verifying in place.


def test_verify_unit_passes_good_unit(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)

    assert verify_unit(fresh_backend(store), store.path("unit"), manifest) == []


def test_verify_unit_reports_flipped_byte(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, flip_first_byte(PAYLOAD[WEIGHTS]), "unit", WEIGHTS)

    problems = verify_unit(fresh_backend(store), store.path("unit"), manifest)

    assert len(problems) == 1
    assert isinstance(problems[0], IntegrityError)
    assert problems[0].field == "crc32c"
    assert problems[0].url.endswith(f"unit/{WEIGHTS}")


def test_verify_unit_reports_truncated_file(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, PAYLOAD[WEIGHTS][:100], "unit", WEIGHTS)

    problems = verify_unit(fresh_backend(store), store.path("unit"), manifest)

    assert len(problems) == 1
    assert isinstance(problems[0], IntegrityError)
    assert problems[0].field == "size"
    assert problems[0].found == 100


def test_verify_unit_reports_every_problem(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(store, flip_first_byte(PAYLOAD[WEIGHTS]), "unit", WEIGHTS)
    store.fs().rm_file(store.path("unit", "assets/vocabulary.txt"))

    problems = verify_unit(fresh_backend(store), store.path("unit"), manifest)

    assert sorted(type(problem).__name__ for problem in problems) == ["FileNotFoundError", "IntegrityError"]
    missing = next(problem for problem in problems if isinstance(problem, FileNotFoundError))
    assert "assets/vocabulary.txt" in str(missing)


@pytest.fixture
def gcs_store(request, tmp_path):
    return make_store("gs", request, tmp_path)


def forbid_reads(backend, monkeypatch) -> None:
    def read(*args, **kwargs):
        raise AssertionError("verify_unit read an object although GCS lists a CRC32C for it")

    monkeypatch.setattr(backend, "open_read", read)
    monkeypatch.setattr(backend, "read_bytes", read)
    monkeypatch.setattr(backend.fs, "open", read)
    monkeypatch.setattr(backend.fs, "cat_file", read)


def test_gcs_verify_reads_no_object(gcs_store, tmp_path, monkeypatch):
    backend, root = root_backend(gcs_store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    reader = fresh_backend(gcs_store)
    forbid_reads(reader, monkeypatch)

    assert verify_unit(reader, gcs_store.path("unit"), manifest) == []


def test_gcs_verify_detects_flip_without_reading(gcs_store, tmp_path, monkeypatch):
    backend, root = root_backend(gcs_store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    replace_stored_file(gcs_store, flip_first_byte(PAYLOAD[WEIGHTS]), "unit", WEIGHTS)
    reader = fresh_backend(gcs_store)
    forbid_reads(reader, monkeypatch)

    problems = verify_unit(reader, gcs_store.path("unit"), manifest)

    assert [problem.field for problem in problems] == ["crc32c"]


# Removing.


def test_delete_unit_removes_every_file(store, tmp_path):
    backend, root = root_backend(store)
    commit_unit(backend, backend.join(root, "unit"), tmp_path)
    commit_unit(backend, backend.join(root, "other"), tmp_path)

    delete_unit(backend, backend.join(root, "unit"))

    assert stored_names(store, "unit") == []
    assert read_manifest(fresh_backend(store), store.path("other")) is not None


def test_delete_unit_removes_manifest_first(store, tmp_path, monkeypatch):
    backend, root = root_backend(store)
    commit_unit(backend, backend.join(root, "unit"), tmp_path)

    def interrupted(path):
        raise OSError("connection lost")

    monkeypatch.setattr(backend, "delete_tree", interrupted)
    with pytest.raises(OSError, match="connection lost"):
        delete_unit(backend, backend.join(root, "unit"))

    assert read_manifest(fresh_backend(store), store.path("unit")) is None
    assert store.path("unit", WEIGHTS) in stored_names(store, "unit")


def test_remove_fragment_removes_claim_without_manifest(store, tmp_path):
    backend, root = root_backend(store)
    start_unit(backend, backend.join(root, "unit"), tmp_path)

    assert remove_fragment(backend, backend.join(root, "unit")) is True
    assert stored_names(store, "unit") == []


def test_remove_fragment_keeps_committed_unit(store, tmp_path):
    backend, root = root_backend(store)
    commit_unit(backend, backend.join(root, "unit"), tmp_path)
    before = stored_names(store, "unit")

    assert remove_fragment(backend, backend.join(root, "unit")) is False
    assert stored_names(store, "unit") == before
    assert read_manifest(fresh_backend(store), store.path("unit")) is not None


def test_remove_fragment_keeps_folder_without_claim(store):
    backend, root = root_backend(store)
    backend.write_bytes(backend.join(root, "notes", "todo.txt"), b"not statefs data")

    assert remove_fragment(backend, backend.join(root, "notes")) is False
    assert stored_names(store, "notes") == [store.path("notes", "todo.txt")]


# CheckpointManager on top of the protocol.


@pytest.fixture(scope="module")
def trained_model(digits):
    """One small trained model for the module. Saving does not change it."""
    model = build_model()
    x, y, _, _ = digits
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    return model


def checkpoint_manager(store, **kwargs) -> statefs.CheckpointManager:
    return statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options, **kwargs)


def test_latest_is_none_on_empty_root(store):
    manager = checkpoint_manager(store)

    assert manager.latest() is None
    assert manager.list() == []


def test_latest_ignores_uncommitted_checkpoint(store, tmp_path, trained_model):
    manager = checkpoint_manager(store)
    manager.save(trained_model, step=1)
    start_unit(manager.backend, manager.backend.join(manager.path, "ckpt-7"), tmp_path)

    assert manager.latest().step == 1
    assert [checkpoint.step for checkpoint in manager.list()] == [1]


def test_latest_ignores_checkpoint_with_invalid_manifest(store, trained_model):
    manager = checkpoint_manager(store)
    manager.save(trained_model, step=1)
    backend = fresh_backend(store)
    backend.write_bytes(store.path("ckpt", "ckpt-9", WEIGHTS), b"weights")
    backend.write_bytes(store.path("ckpt", "ckpt-9", MANIFEST_NAME), b"{not json")

    assert manager.latest().step == 1


def test_rotation_keeps_foreign_folders(store, trained_model):
    backend = fresh_backend(store)
    foreign = {
        store.path("ckpt", "notes", "todo.txt"): b"notes",
        store.path("ckpt", "ckpt-best", WEIGHTS): b"hand-made copy",
        store.path("ckpt", "README.txt"): b"readme",
    }
    for path, data in foreign.items():
        backend.write_bytes(path, data)
    manager = checkpoint_manager(store, max_to_keep=1)

    for step in (1, 2, 3):
        manager.save(trained_model, step=step)

    remaining = stored_names(store, "ckpt")
    assert [checkpoint.step for checkpoint in manager.list()] == [3]
    assert all(path in remaining for path in foreign)


def test_rotation_keeps_uncommitted_checkpoint(store, tmp_path, trained_model):
    manager = checkpoint_manager(store, max_to_keep=1)
    start_unit(manager.backend, manager.backend.join(manager.path, "ckpt-0"), tmp_path)

    for step in (1, 2, 3):
        manager.save(trained_model, step=step)

    remaining = stored_names(store, "ckpt")
    assert [checkpoint.step for checkpoint in manager.list()] == [3]
    assert store.path("ckpt", "ckpt-0", WEIGHTS) in remaining
    assert store.path("ckpt", "ckpt-1", WEIGHTS) not in remaining


def test_commit_returns_manifest_with_created_time(store, tmp_path):
    backend, root = root_backend(store)

    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)

    assert manifest.created
    assert read_manifest(fresh_backend(store), store.path("unit")).created == manifest.created


def test_download_unit_names_missing_file_url(store, tmp_path):
    backend, root = root_backend(store)
    manifest = commit_unit(backend, backend.join(root, "unit"), tmp_path)
    store.fs().rm_file(store.path("unit", WEIGHTS))

    with pytest.raises(FileNotFoundError, match="listed in the manifest but missing") as raised:
        download_unit(fresh_backend(store), store.path("unit"), manifest, str(tmp_path / "download"))
    assert store.url("unit", WEIGHTS).split("://")[-1] in str(raised.value)
