"""Single-file snapshots: formats, sidecar checks, suffix validation, staging cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import h5py
import numpy as np
import pytest

import statefs
from conftest import FailingWriter, build_model, predictions_equal
from statefs import backends
from statefs.snapshots import SIDECAR_SUFFIX

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def stored_names(store) -> set[str]:
    """Return every file under the root, relative to it, as a new filesystem instance lists them."""
    fs = store.fs()
    root = store.path().rstrip("/") + "/"
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return set()
    return {path[len(root):] for path in found}


def flip_byte(store, name: str) -> None:
    """Invert one byte in the middle of a stored file, through a new filesystem instance."""
    fs = store.fs()
    data = bytearray(fs.cat_file(store.path(name)))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(store.path(name), bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits.keras", "digits.h5"])
def test_full_model_snapshot_round_trip(store, trained, digits, name):
    url = store.url("snap", name)

    statefs.save_snapshot(trained, url, storage_options=store.storage_options)
    loaded = statefs.load_snapshot(url, storage_options=store.storage_options)

    assert predictions_equal(loaded, trained, digits[2])


@pytest.mark.slow
def test_h5_save_keeps_optimizer_for_keras(store, model):
    statefs.save_snapshot(model, store.url("snap", "digits.h5"), storage_options=store.storage_options)
    url = store.url("snap", "digits.keras")
    statefs.save_snapshot(model, url, storage_options=store.storage_options)

    loaded = statefs.load_snapshot(url, storage_options=store.storage_options)

    assert type(loaded.optimizer) is type(model.optimizer)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for expected, found in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(found.numpy(), expected.numpy())


@pytest.mark.slow
def test_weights_snapshot_loads_into_same_architecture(store, trained, digits):
    url = store.url("snap", "digits.weights.h5")
    statefs.save_snapshot(trained, url, storage_options=store.storage_options)
    fresh = build_model()

    loaded = statefs.load_snapshot(url, model=fresh, storage_options=store.storage_options)

    assert loaded is fresh
    assert predictions_equal(fresh, trained, digits[2])


@pytest.mark.slow
def test_save_writes_sidecar_with_size_and_crc32c(store, trained):
    url = store.url("snap", "digits.keras")

    snapshot = statefs.save_snapshot(trained, url, storage_options=store.storage_options)

    fs = store.fs()
    sidecar = json.loads(fs.cat_file(store.path("snap", "digits.keras" + SIDECAR_SUFFIX)))
    assert sidecar["kind"] == "snapshot"
    assert sidecar["files"]["digits.keras"] == {"size": snapshot.size, "crc32c": snapshot.crc32c}
    assert fs.size(store.path("snap", "digits.keras")) == snapshot.size
    assert snapshot.format == "keras"


@pytest.mark.slow
def test_flipped_byte_raises_integrity_error(store, trained):
    url = store.url("snap", "digits.keras")
    statefs.save_snapshot(trained, url, storage_options=store.storage_options)
    flip_byte(store, "snap/digits.keras")

    with pytest.raises(statefs.IntegrityError, match="crc32c"):
        statefs.load_snapshot(url, storage_options=store.storage_options)


@pytest.mark.slow
def test_weights_load_without_model_raises(store, trained):
    url = store.url("snap", "digits.weights.h5")
    statefs.save_snapshot(trained, url, storage_options=store.storage_options)

    with pytest.raises(ValueError, match="Pass the model") as raised:
        statefs.load_snapshot(url, storage_options=store.storage_options)
    assert "digits.weights.h5" in str(raised.value)


@pytest.mark.parametrize("name", ["m", "m.txt"])
def test_unknown_suffix_raises_before_writing(store, name):
    model = build_model()

    with pytest.raises(ValueError, match="Invalid snapshot URL") as raised:
        statefs.save_snapshot(model, store.url("models", name), storage_options=store.storage_options)

    message = str(raised.value)
    for suffix in (".keras", ".h5", ".weights.h5"):
        assert suffix in message
    assert repr(store.url("models", name)) in message
    assert stored_names(store) == set()


@pytest.mark.slow
def test_registry_under_numbered_folder_counts_from_one(store, trained):
    registry = statefs.VersionRegistry(store.url("models", "m", "3"), storage_options=store.storage_options)

    assert registry.publish(trained) == 1
    assert registry.list() == [1]
    assert "models/m/3/1/saved_model.pb" in stored_names(store)


def statefs_staging_entries() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("statefs-")}


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch):
    """Point tempfile at a folder of this test's own, so other processes' staging cannot interfere."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return str(folder)


@pytest.fixture
def h5py_paths(monkeypatch):
    """Return a list that collects the first argument of every h5py.File opened."""
    opened = []

    class RecordingFile(h5py.File):
        def __init__(self, name, *args, **kwargs):
            opened.append(name)
            super().__init__(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", RecordingFile)
    return opened


CHILD_LOAD = """
    import json, sys
    sys.path.insert(0, {tests_dir!r})
    import numpy as np
    import statefs
    from conftest import build_model

    x = np.asarray({x!r}, dtype="float32")
    weights_model = statefs.load_snapshot({weights_url!r}, model=build_model())
    full_model = statefs.load_snapshot({full_url!r})
    print(json.dumps({{
        "weights": weights_model.predict(x, verbose=0).tolist(),
        "full": full_model.predict(x, verbose=0).tolist(),
    }}))
"""


@pytest.mark.slow
def test_h5_snapshots_load_in_new_process(shared_store, trained, digits, run_fresh):
    weights_url = shared_store.url("a", "digits.weights.h5")
    full_url = shared_store.url("a", "digits.h5")
    statefs.save_snapshot(trained, weights_url, storage_options=shared_store.storage_options)
    statefs.save_snapshot(trained, full_url, storage_options=shared_store.storage_options)
    x_sample = digits[2][:5]

    code = CHILD_LOAD.format(tests_dir=TESTS_DIR, x=x_sample.tolist(), weights_url=weights_url, full_url=full_url)
    output = json.loads(run_fresh(code, shared_store))

    expected = trained.predict(x_sample, verbose=0)
    np.testing.assert_array_equal(np.asarray(output["weights"], dtype=expected.dtype), expected)
    np.testing.assert_array_equal(np.asarray(output["full"], dtype=expected.dtype), expected)


@pytest.mark.slow
def test_staging_removed_after_success(shared_store, trained, private_tempdir, h5py_paths):
    before = statefs_staging_entries()

    for name, model in (("digits.weights.h5", build_model()), ("digits.h5", None)):
        url = shared_store.url("a", name)
        statefs.save_snapshot(trained, url, storage_options=shared_store.storage_options)
        statefs.load_snapshot(url, model=model, storage_options=shared_store.storage_options)

    assert statefs_staging_entries() == before
    assert len(h5py_paths) >= 4
    for opened in h5py_paths:
        assert isinstance(opened, (str, os.PathLike)), opened
        path = os.fspath(opened)
        assert "://" not in path
        assert os.path.commonpath([private_tempdir, path]) == private_tempdir


@pytest.mark.slow
def test_staging_removed_after_failed_upload(shared_store, trained, private_tempdir, h5py_paths, monkeypatch):
    backend_class = type(backends.resolve(shared_store.url(), shared_store.storage_options)[0])
    original_open_write = backend_class.open_write

    @contextlib.contextmanager
    def failing_open_write(self, path):
        with original_open_write(self, path) as handle:
            yield FailingWriter(handle, limit=1024)

    monkeypatch.setattr(backend_class, "open_write", failing_open_write)
    before = statefs_staging_entries()

    for name in ("digits.weights.h5", "digits.h5"):
        with pytest.raises(ConnectionResetError):
            statefs.save_snapshot(trained, shared_store.url("a", name), storage_options=shared_store.storage_options)

    assert statefs_staging_entries() == before
    assert len(h5py_paths) == 2
    assert all(os.fspath(path).startswith(private_tempdir) for path in h5py_paths)
    assert stored_names(shared_store) == set()
