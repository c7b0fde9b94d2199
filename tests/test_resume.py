"""Exact resume: custom loops and Keras's fit continue as if never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import build_model, make_store, stored_files

import statefs
import statefs.keras

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(TESTS_DIR, "resume_child.py")


@pytest.fixture(params=("file", "s3"))
def child_store(request, tmp_path):
    """An empty root that a child process reaches too: local disk and S3 on the moto server."""
    return make_store(request.param, request, tmp_path)


def run_child(store, *args: str) -> dict:
    """Run resume_child.py in a new process; return the JSON it prints, if any."""
    env = {**os.environ, **store.env}
    completed = subprocess.run(
        [sys.executable, CHILD, store.url("ckpt"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"child process failed:\n{completed.stderr[-4000:]}"
    return json.loads(completed.stdout) if completed.stdout.strip() else {}


@pytest.mark.slow
def test_custom_loop_resume_bit_identical(child_store):
    uninterrupted = run_child(child_store, "full")

    run_child(child_store, "stop", "1", "4")
    resumed = run_child(child_store, "resume")

    assert resumed == uninterrupted
    assert resumed["iterations"] == 30


@pytest.mark.slow
def test_resume_without_random_state_diverges(tmp_path):
    store = make_store("file", None, tmp_path)
    uninterrupted = run_child(store, "full")

    run_child(store, "stop", "1", "4")
    resumed = run_child(store, "resume", "--no-rng")

    # The same run resumed without the generators' states draws other noise
    # and dropout masks, so restoring them is what makes the resume exact.
    assert resumed["iterations"] == uninterrupted["iterations"]
    assert resumed["digest"] != uninterrupted["digest"]


def variable_digests(variables) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(v.numpy()).tobytes()).hexdigest() for v in variables]


@pytest.mark.slow
def test_fresh_process_restores_adam_state(digits, tmp_path, request, run_fresh):
    store = make_store("s3", request, tmp_path)
    x, y, _, _ = digits
    model = build_model()
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options).save(model, epoch=1)
    expected = variable_digests(model.optimizer.variables)

    code = f"""
import hashlib, json, sys
sys.path.insert(0, {TESTS_DIR!r})
import numpy as np
import statefs
from conftest import build_model
model = build_model()
statefs.CheckpointManager({store.url("ckpt")!r}).restore(model)
print(json.dumps({{
    "built_before_any_step": model.optimizer.built,
    "iterations": int(model.optimizer.iterations.numpy()),
    "digests": [hashlib.sha256(np.ascontiguousarray(v.numpy()).tobytes()).hexdigest() for v in model.optimizer.variables],
}}))
"""
    restored = json.loads(run_fresh(code, store))

    assert restored["built_before_any_step"]
    assert restored["iterations"] == int(model.optimizer.iterations.numpy()) == 24
    assert restored["digests"] == expected


class Interrupt(keras.callbacks.Callback):
    """Raises at the start of one epoch, or after one batch, as a preempted job would stop."""

    def __init__(self, epoch: int, batch: int | None = None):
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self.current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch
        if self.batch is None and epoch == self.epoch:
            raise RuntimeError(f"interrupted at epoch {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise RuntimeError(f"interrupted after batch {batch} of epoch {self.current}")


class FirstStep(keras.callbacks.Callback):
    """Records the optimizer's iteration count and the weights when the first batch of a fit begins."""

    def __init__(self):
        super().__init__()
        self.iterations = None
        self.weights = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.iterations is None:
            self.iterations = int(self.model.optimizer.iterations.numpy())
            self.weights = [w.copy() for w in self.model.get_weights()]


class EpochWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]


@pytest.mark.slow
def test_backup_resumes_interrupted_epoch(digits, tmp_path, request):
    store = make_store("s3", request, tmp_path)
    x, y, _, _ = digits
    x, y = x[:256], y[:256]
    model = build_model()
    backup = statefs.keras.BackupAndRestore(store.url("bk"), storage_options=store.storage_options)
    seen = EpochWeights()

    with pytest.raises(RuntimeError, match="interrupted at epoch 4"):
        model.fit(x, y, epochs=10, batch_size=64, verbose=0, callbacks=[backup, seen, Interrupt(4)])
    assert any(path.endswith("statefs-manifest.json") for path in stored_files(store, "bk"))

    restarted = build_model()
    first = FirstStep()
    history = restarted.fit(x, y, epochs=10, batch_size=64, verbose=0, callbacks=[backup, first])

    assert first.iterations == 4 * 4
    for found, expected in zip(first.weights, seen.weights[3], strict=True):
        np.testing.assert_array_equal(found, expected)
    assert history.epoch == [4, 5, 6, 7, 8, 9]
    assert len(history.history["loss"]) == 6
    assert stored_files(store, "bk") == {}


def fit_digits(model, x, y, callbacks=(), epochs=3):
    return model.fit(x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0, callbacks=list(callbacks))


def dropout_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.slow
def test_fit_resumes_mid_epoch_exactly(digits, tmp_path):
    x, y, _, _ = digits
    x, y = x[:640], y[:640]
    uninterrupted = dropout_model()
    expected = fit_digits(uninterrupted, x, y)
    backup_dir = str(tmp_path / "backup")

    interrupted = dropout_model()
    with pytest.raises(RuntimeError, match="after batch 11"):
        fit_digits(interrupted, x, y, [statefs.keras.BackupAndRestore(backup_dir, save_freq=4), Interrupt(1, 11)])
    restarted = dropout_model()
    first = FirstStep()
    resumed = fit_digits(restarted, x, y, [statefs.keras.BackupAndRestore(backup_dir, save_freq=4), first])

    # 20 batches per epoch; the last backup was taken after 12 batches of epoch 1.
    assert first.iterations == 20 + 12
    assert resumed.epoch == [1, 2]
    for found, expected_weights in zip(restarted.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(found, expected_weights)
    assert resumed.history["loss"][1] == expected.history["loss"][2]


@pytest.mark.slow
def test_double_checkpoint_falls_back_to_the_previous_backup(digits, tmp_path):
    x, y, _, _ = digits
    x, y = x[:256], y[:256]
    backup_dir = tmp_path / "backup"
    model = build_model()
    with pytest.raises(RuntimeError):
        model.fit(
            x, y, epochs=5, batch_size=64, verbose=0,
            callbacks=[statefs.keras.BackupAndRestore(str(backup_dir), double_checkpoint=True), Interrupt(3)],
        )
    newest = max(backup_dir.glob("ckpt-*"), key=lambda path: int(path.name.split("-")[1]))
    state = newest / "state.bin"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))

    history = build_model().fit(
        x, y, epochs=5, batch_size=64, verbose=0,
        callbacks=[statefs.keras.BackupAndRestore(str(backup_dir), double_checkpoint=True)],
    )

    assert history.epoch == [2, 3, 4]


def test_backup_kept_when_delete_checkpoint_is_false(digits, tmp_path):
    x, y, _, _ = digits
    backup_dir = tmp_path / "backup"
    model = build_model()

    model.fit(
        x[:128], y[:128], epochs=2, batch_size=64, verbose=0,
        callbacks=[statefs.keras.BackupAndRestore(str(backup_dir), delete_checkpoint=False)],
    )

    assert [path.name for path in backup_dir.glob("ckpt-*")] == ["ckpt-4"]


def test_next_fit_starts_at_epoch_zero(digits, tmp_path):
    x, y, _, _ = digits
    model = build_model()
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError):
        model.fit(x[:128], y[:128], epochs=3, batch_size=64, verbose=0,
                  callbacks=[statefs.keras.BackupAndRestore(backup_dir), Interrupt(2)])
    model.fit(x[:128], y[:128], epochs=3, batch_size=64, verbose=0,
              callbacks=[statefs.keras.BackupAndRestore(backup_dir)])

    history = model.fit(x[:128], y[:128], epochs=2, batch_size=64, verbose=0)

    assert history.epoch == [0, 1]


@pytest.mark.parametrize("save_freq", [0, -3, "batch", 2.5, True])
def test_backup_refuses_invalid_save_freq(save_freq, tmp_path):
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or a positive integer"):
        statefs.keras.BackupAndRestore(str(tmp_path / "backup"), save_freq=save_freq)


def test_backup_refuses_empty_backup_dir():
    with pytest.raises(ValueError, match="needs a backup_dir URL"):
        statefs.keras.BackupAndRestore("")


def test_backup_needs_a_built_model(tmp_path, digits):
    x, y, _, _ = digits
    model = keras.Sequential([keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="needs a built model"):
        model.fit(x[:64], y[:64], epochs=1, verbose=0, callbacks=[statefs.keras.BackupAndRestore(str(tmp_path / "b"))])
