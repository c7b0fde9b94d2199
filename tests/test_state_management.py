"""StateManagement: the original four methods, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import statefs

pytestmark = pytest.mark.slow

X = np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0], dtype="float32").reshape(-1, 1)
Y = 2 * X - 1


@pytest.fixture
def state(store):
    """A StateManagement over a one-unit linear model, compiled for training."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mean_squared_error")
    return statefs.StateManagement(model, storage_options=store.storage_options)


def exists(store, *parts: str) -> bool:
    """Return whether a new filesystem instance finds `parts` under the root."""
    return store.fs().exists(store.path(*parts))


def test_model_checkpointing_saves_under_checkpoint_dir(store, state):
    history = state.model_checkpointing(store.url("checkpoints"), x=X, y=Y, epochs=2, verbose=0)

    assert len(history.history["loss"]) == 2
    fs = store.fs()
    manifests = [path for path in fs.find(store.path("checkpoints")) if path.endswith("/statefs-manifest.json")]
    assert len(manifests) == 2
    listed = statefs.CheckpointManager(store.url("checkpoints"), storage_options=store.storage_options).list()
    assert [checkpoint.epoch for checkpoint in listed] == [1, 2]


def test_model_version_control_creates_version_folder(store, state):
    number = state.model_version_control(store.url("models"), "1")

    assert number == 1
    assert exists(store, "models", "1")
    assert exists(store, "models", "1", "saved_model.pb")


def test_model_snapshot_creates_my_model_h5(store, state):
    state.model_snapshot(store.url("snapshots"))

    assert exists(store, "snapshots", "my_model.h5")


def test_model_migration_copies_into_new_folder(store, state):
    old, new = store.url("old"), store.url("new")
    state.model_snapshot(old)

    state.model_migration(f"{old}/my_model.h5", new)

    assert exists(store, "new", "my_model.h5")
    fs = store.fs()
    assert fs.cat_file(store.path("new", "my_model.h5")) == fs.cat_file(store.path("old", "my_model.h5"))
