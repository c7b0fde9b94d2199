"""VersionRegistry: numbered versions in the TensorFlow Serving layout."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import statefs
from conftest import build_model, predictions_equal, stored_files

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "statefs-manifest.json"
CLAIM = ".statefs-claim"


def registry_for(store, name: str = "models/digits") -> statefs.VersionRegistry:
    return statefs.VersionRegistry(store.url(name), storage_options=store.storage_options)


def copy_folder(store, source: str, destination: str, *, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `source` to `destination` with a new filesystem instance."""
    fs = store.fs()
    for relative in stored_files(store, source):
        if relative.rsplit("/", 1)[-1] in skip:
            continue
        target = store.path(destination, relative)
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(target, fs.cat_file(store.path(source, relative)))


def test_empty_root_has_no_versions(store):
    registry = registry_for(store)

    assert registry.list() == []
    assert registry.latest() is None
    with pytest.raises(FileNotFoundError, match="No committed version"):
        registry.load()


@pytest.mark.slow
def test_publish_numbers_versions_from_one(store, trained):
    registry = registry_for(store)

    assert registry.publish(trained) == 1
    assert registry.publish(trained) == 2
    assert registry.list() == [1, 2]
    assert registry.latest() == 2


@pytest.mark.slow
def test_version_folder_has_serving_layout(store, trained):
    registry_for(store).publish(trained)

    files = stored_files(store, "models/digits/1")

    assert files["saved_model.pb"] > 0
    assert files["variables/variables.index"] > 0
    assert any(name.startswith("variables/variables.data-") for name in files)
    assert files["model.keras"] > 0
    assert files[MANIFEST] > 0


@pytest.mark.slow
def test_manifest_lists_every_payload_file(store, trained):
    registry = registry_for(store)
    registry.publish(trained, metadata={"val_accuracy": 0.5})

    manifest = registry.manifest(1)

    payload = {name: size for name, size in stored_files(store, "models/digits/1").items() if name not in (MANIFEST, CLAIM)}
    assert {name: digest.size for name, digest in manifest.files.items()} == payload
    assert manifest.kind == "version"
    assert manifest.metadata == {"val_accuracy": 0.5, "version": 1}


@pytest.mark.slow
def test_load_predicts_like_published_model(store, trained, digits):
    registry = registry_for(store)
    registry.publish(trained)

    loaded = registry.load(1)

    assert predictions_equal(loaded, trained, digits[2])


@pytest.mark.slow
def test_publish_existing_number_raises(store, trained, digits):
    registry = registry_for(store)
    registry.publish(trained, version=1)
    before = stored_files(store, "models/digits/1")
    manifest_before = store.fs().cat_file(store.path("models/digits/1", MANIFEST))

    with pytest.raises(statefs.UnitExistsError, match="already committed") as raised:
        registry.publish(build_model(), version=1)

    assert registry.url + "/1" in str(raised.value)
    assert stored_files(store, "models/digits/1") == before
    assert store.fs().cat_file(store.path("models/digits/1", MANIFEST)) == manifest_before
    assert predictions_equal(registry.load(1), trained, digits[2])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tmp", "3.bak"])
def test_non_numeric_folder_is_not_a_version(store, trained, name):
    registry = registry_for(store)
    registry.publish(trained)
    # The copy has a valid manifest, so only its name keeps it from counting.
    copy_folder(store, "models/digits/1", f"models/digits/{name}")

    assert registry.list() == [1]
    assert registry.latest() == 1
    assert registry.publish(trained) == 2


@pytest.mark.slow
def test_uncommitted_numeric_folder_is_not_a_version(store, trained):
    registry = registry_for(store)
    registry.publish(trained)
    copy_folder(store, "models/digits/1", "models/digits/2", skip=(MANIFEST,))

    assert registry.list() == [1]
    assert registry.latest() == 1
    with pytest.raises(statefs.NotCommittedError):
        registry.load(2)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_version_root_with_file_suffix_rejected(store, suffix):
    with pytest.raises(ValueError, match="Invalid version root"):
        registry_for(store, f"models/digits{suffix}")


def download(store, name: str, local_folder) -> None:
    fs = store.fs()
    for relative in stored_files(store, name):
        target = os.path.join(local_folder, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(store.path(name, relative), target)


@pytest.mark.slow
def test_saved_model_loads_with_tensorflow(store, trained, digits, tmp_path):
    import tensorflow as tf

    registry_for(store).publish(trained)
    download(store, "models/digits", tmp_path / "serving")

    loaded = tf.saved_model.load(str(tmp_path / "serving" / "1"))

    x_test = digits[2]
    served = loaded.serve(tf.constant(x_test)).numpy()
    np.testing.assert_allclose(served, trained.predict(x_test, verbose=0), rtol=1e-5, atol=1e-6)
    assert "serving_default" in loaded.signatures


@pytest.mark.slow
def test_saved_model_pb_uploads_after_variables(store, trained):
    registry = registry_for(store)
    written: list[str] = []
    original_open_write = registry.backend.open_write
    original_create_exclusive = registry.backend.create_exclusive

    @contextlib.contextmanager
    def open_write(path):
        written.append(path)
        with original_open_write(path) as handle:
            yield handle

    def create_exclusive(path, data):
        written.append(path)
        original_create_exclusive(path, data)

    registry.backend.open_write = open_write
    registry.backend.create_exclusive = create_exclusive
    registry.publish(trained)

    names = [path[len(registry.path) + 1:] for path in written]
    assert names[0] == f"1/{CLAIM}"
    assert names[-1] == f"1/{MANIFEST}"
    assert names[-2] == "1/saved_model.pb"
    variables = [index for index, name in enumerate(names) if name.startswith("1/variables/")]
    assert len(variables) >= 2
    assert max(variables) < names.index("1/saved_model.pb")
    assert names.index("1/model.keras") < names.index(f"1/{MANIFEST}")


CHILD_LOAD = """
    import json, sys
    import numpy as np
    import statefs

    registry = statefs.VersionRegistry({url!r})
    model = registry.load(1)
    x = np.asarray({x!r}, dtype="float32")
    print(json.dumps({{
        "versions": registry.list(),
        "predictions": model.predict(x, verbose=0).tolist(),
        "tensorflow_io": "tensorflow_io" in sys.modules,
    }}))
"""


@pytest.mark.slow
def test_published_version_loads_in_new_process(shared_store, trained, digits, run_fresh):
    assert importlib.util.find_spec("tensorflow_io") is None or "tensorflow_io" not in sys.modules
    registry = registry_for(shared_store)
    registry.publish(trained)
    assert "tensorflow_io" not in sys.modules
    x_sample = digits[2][:5]

    output = json.loads(run_fresh(CHILD_LOAD.format(url=registry.url, x=x_sample.tolist()), shared_store))

    assert output["versions"] == [1]
    assert output["tensorflow_io"] is False
    expected = trained.predict(x_sample, verbose=0)
    np.testing.assert_array_equal(np.asarray(output["predictions"], dtype=expected.dtype), expected)
