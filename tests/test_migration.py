"""migrate: snapshots, version roots and checkpoint roots between stores."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

import statefs
from conftest import build_model, predictions_equal, stored_files
from statefs.commit import UnitWriter
from statefs.keras_io import LegacyCompileWarning
from statefs.snapshots import SIDECAR_SUFFIX

MANIFEST = "statefs-manifest.json"

pytestmark = pytest.mark.slow


def read(store, name: str) -> bytes:
    return store.fs().cat_file(store.path(name))


def flip_byte(store, name: str) -> None:
    """Invert one byte in the middle of a stored file, through a new filesystem instance."""
    fs = store.fs()
    data = bytearray(fs.cat_file(store.path(name)))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(store.path(name), bytes(data))


def migrate(source, src_name: str, target, dst_name: str) -> statefs.MigrationReport:
    return statefs.migrate(
        source.url(src_name),
        target.url(dst_name),
        src_storage_options=source.storage_options,
        dst_storage_options=target.storage_options,
    )


def write_fragment(store, name: str, payload: bytes = b"partial") -> None:
    """Leave a claimed unit with payload but no manifest, as a writer that died would."""
    backend, path = statefs.backends.resolve(store.url(name), store.storage_options)
    writer = UnitWriter(backend, path, kind="version")
    writer.claim()
    with backend.open_write(backend.join(path, "model.keras")) as handle:
        handle.write(payload)


@pytest.mark.parametrize(("src_backend", "dst_backend"), [("file", "s3"), ("s3", "gs"), ("gs", "file"), ("memory", "file")])
def test_snapshot_copy_is_byte_identical(other_store, trained, src_backend, dst_backend):
    source, target = other_store(src_backend), other_store(dst_backend)
    statefs.save_snapshot(trained, source.url("snap/digits.keras"), storage_options=source.storage_options)

    report = migrate(source, "snap/digits.keras", target, "copy/digits.keras")

    assert [item.action for item in report.items] == ["copied"]
    assert read(target, "copy/digits.keras") == read(source, "snap/digits.keras")
    source_sidecar = json.loads(read(source, "snap/digits.keras" + SIDECAR_SUFFIX))
    target_sidecar = json.loads(read(target, "copy/digits.keras" + SIDECAR_SUFFIX))
    assert target_sidecar["files"] == source_sidecar["files"]


def test_snapshot_copy_keeps_sidecar_metadata(other_store, trained):
    source, target = other_store("memory"), other_store("file")
    metadata = {"writer": "statefs.keras.ModelCheckpoint", "epoch": 3}
    statefs.save_snapshot(trained, source.url("snap/model-03.keras"), metadata=metadata)

    migrate(source, "snap/model-03.keras", target, "copy/model-03.keras")

    target_sidecar = json.loads(read(target, "copy/model-03.keras" + SIDECAR_SUFFIX))
    assert target_sidecar["metadata"] == {**metadata, "format": "keras"}


def test_folder_destination_keeps_file_name(other_store, trained, digits):
    source, target = other_store("s3"), other_store("file")
    statefs.save_snapshot(trained, source.url("snap/digits.keras"), storage_options=source.storage_options)

    report = migrate(source, "snap/digits.keras", target, "exported")

    assert report.items[0].destination.endswith("/exported/digits.keras")
    assert set(stored_files(target, "exported")) == {"digits.keras", "digits.keras" + SIDECAR_SUFFIX}
    loaded = statefs.load_snapshot(target.url("exported/digits.keras"))
    assert predictions_equal(loaded, trained, digits[2])


def test_version_root_copies_committed_versions_only(other_store, trained, digits):
    source, target = other_store("gs"), other_store("s3")
    registry = statefs.VersionRegistry(source.url("models"), storage_options=source.storage_options)
    registry.publish(trained)
    registry.publish(build_model())
    write_fragment(source, "models/3")

    report = migrate(source, "models", target, "models")

    assert [item.action for item in report.items] == ["copied", "copied"]
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(source.url("models/3"))
    copied = statefs.VersionRegistry(target.url("models"), storage_options=target.storage_options)
    assert copied.list() == [1, 2]
    assert predictions_equal(copied.load(1), trained, digits[2])
    assert not any(name.startswith("3/") for name in stored_files(target, "models"))


def test_checkpoint_root_copies_committed_checkpoints_only(other_store, trained):
    source, target = other_store("s3"), other_store("file")
    manager = statefs.CheckpointManager(source.url("ckpt"), storage_options=source.storage_options)
    manager.save(trained, step=1, epoch=1)
    manager.save(trained, step=2, epoch=2)
    write_fragment(source, "ckpt/ckpt-9")

    report = migrate(source, "ckpt", target, "ckpt")

    assert len(report.items) == 2
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(source.url("ckpt/ckpt-9"))
    copied = statefs.CheckpointManager(target.url("ckpt"))
    assert [(checkpoint.step, checkpoint.epoch) for checkpoint in copied.list()] == [(1, 1), (2, 2)]
    fresh = build_model()
    copied.restore(fresh)
    for expected, found in zip(trained.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(found, expected)
    assert int(fresh.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy())


def test_second_migration_reports_already_present(other_store, trained):
    source, target = other_store("file"), other_store("memory")
    registry = statefs.VersionRegistry(source.url("models"))
    registry.publish(trained)
    registry.publish(trained)
    migrate(source, "models", target, "models")
    files_after_first = stored_files(target, "models")

    report = migrate(source, "models", target, "models")

    assert [item.action for item in report.items] == ["already present", "already present"]
    assert stored_files(target, "models") == files_after_first


def test_corrupted_version_raises_and_commits_nothing(other_store, trained):
    source, target = other_store("file"), other_store("s3")
    statefs.VersionRegistry(source.url("models")).publish(trained)
    flip_byte(source, "models/1/model.keras")

    with pytest.raises(statefs.IntegrityError, match="model.keras"):
        migrate(source, "models", target, "models")

    assert statefs.VersionRegistry(target.url("models"), storage_options=target.storage_options).list() == []
    assert not any(name.endswith(MANIFEST) for name in stored_files(target))


def test_corrupted_snapshot_raises_and_leaves_no_file(other_store, trained):
    source, target = other_store("file"), other_store("gs")
    statefs.save_snapshot(trained, source.url("snap/digits.keras"))
    flip_byte(source, "snap/digits.keras")

    with pytest.raises(statefs.IntegrityError, match="digits.keras"):
        migrate(source, "snap/digits.keras", target, "copy/digits.keras")

    assert stored_files(target) == {}


def test_different_unit_at_destination_raises(other_store, trained):
    source, target = other_store("memory"), other_store("file")
    statefs.VersionRegistry(source.url("models")).publish(trained)
    statefs.VersionRegistry(target.url("models")).publish(build_model())
    manifest_before = read(target, f"models/1/{MANIFEST}")

    with pytest.raises(statefs.UnitExistsError, match="different committed version"):
        migrate(source, "models", target, "models")

    assert read(target, f"models/1/{MANIFEST}") == manifest_before


@pytest.mark.parametrize("content", ["empty", "unrelated files"])
def test_source_without_state_raises(other_store, content):
    source, target = other_store("memory"), other_store("file")
    if content == "unrelated files":
        fs = source.fs()
        fs.pipe_file(source.path("runs/notes.txt"), b"not a model")
        fs.pipe_file(source.path("runs/tmp/data.bin"), b"\x00" * 16)

    with pytest.raises(FileNotFoundError, match="Nothing to migrate"):
        migrate(source, "runs", target, "runs")

    assert stored_files(target) == {}


def test_legacy_h5_with_mse_converts_to_keras(other_store, digits):
    source, target = other_store("file"), other_store("s3")
    model = build_model(loss="mse")
    statefs.save_snapshot(model, source.url("snap/digits.h5"))

    with pytest.warns(LegacyCompileWarning, match="without its compile settings"):
        report = migrate(source, "snap/digits.h5", target, "snap/digits.keras")

    assert [item.action for item in report.items] == ["converted"]
    loaded = statefs.load_snapshot(target.url("snap/digits.keras"), storage_options=target.storage_options)
    assert predictions_equal(loaded, model, digits[2])


def unreachable_s3_options(s3_server) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return dict(s3_server.storage_options(), endpoint_url=f"http://127.0.0.1:{port}")


def test_unreachable_source_fails_fast(s3_server, tmp_path):
    options = unreachable_s3_options(s3_server)
    started = time.perf_counter()

    with pytest.raises(ConnectionError, match="127.0.0.1"):
        statefs.migrate("s3://bucket/models", str(tmp_path / "copy"), src_storage_options=options)

    assert time.perf_counter() - started < 5
    assert not (tmp_path / "copy").exists()


def test_unreachable_snapshot_load_fails_fast(s3_server):
    options = unreachable_s3_options(s3_server)
    started = time.perf_counter()

    with pytest.raises(ConnectionError, match="127.0.0.1"):
        statefs.load_snapshot("s3://bucket/snap/digits.keras", storage_options=options)

    assert time.perf_counter() - started < 5
