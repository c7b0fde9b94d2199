"""CheckpointManager: per-epoch saves, rotation, restart, exact restore, failures."""

from __future__ import annotations

import contextlib
import json
import os
import re

import numpy as np
import pytest

import statefs
from conftest import build_model, stored_files

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "statefs-manifest.json"
WEIGHTS = "checkpoint.weights.h5"


def manager_for(store, name: str = "ckpt", **kwargs) -> statefs.CheckpointManager:
    return statefs.CheckpointManager(store.url(name), storage_options=store.storage_options, **kwargs)


def stored_folders(store, name: str) -> set[str]:
    """Return the names of the folders directly under `name`, listed by a new filesystem instance."""
    return {relative.split("/", 1)[0] for relative in stored_files(store, name) if "/" in relative}


def optimizer_state(model) -> list[tuple[str, np.ndarray]]:
    """Return (role, value) of every optimizer variable in order, iterations included.

    The role is the end of the variable name, such as "kernel_momentum",
    because the rest names layers, which differ between two built models.
    """
    return [(variable.name.rsplit("_", 2)[-2:], variable.numpy()) for variable in model.optimizer.variables]


def test_empty_root_has_no_checkpoints(store):
    manager = manager_for(store)

    assert manager.list() == []
    assert manager.latest() is None


@pytest.mark.slow
def test_callback_commits_one_checkpoint_per_epoch(store, digits):
    x, y, _, _ = digits
    model = build_model()
    manager = manager_for(store)

    model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[manager.callback()])

    checkpoints = manager.list()
    assert [checkpoint.epoch for checkpoint in checkpoints] == [1, 2]
    # 1500 samples in batches of 64 make 24 optimizer steps per epoch.
    assert [checkpoint.step for checkpoint in checkpoints] == [24, 48]
    for checkpoint in checkpoints:
        assert set(checkpoint.metrics) == {"loss", "accuracy"}
        assert all(isinstance(value, float) for value in checkpoint.metrics.values())
    files = stored_files(store, "ckpt")
    for step in (24, 48):
        assert MANIFEST in {relative.split("/", 1)[1] for relative in files if relative.startswith(f"ckpt-{step}/")}
        assert files[f"ckpt-{step}/{WEIGHTS}"] > 0


@pytest.mark.slow
def test_rotation_keeps_newest_checkpoints(store, trained):
    manager = manager_for(store, max_to_keep=2)

    for step in range(1, 6):
        manager.save(trained, step=step)

    assert [checkpoint.step for checkpoint in manager.list()] == [4, 5]
    assert stored_folders(store, "ckpt") == {"ckpt-4", "ckpt-5"}


@pytest.mark.slow
def test_restarted_manager_continues_rotation(store, trained):
    first = manager_for(store, max_to_keep=2)
    for step in (1, 2, 3):
        first.save(trained, step=step)

    restarted = manager_for(store, max_to_keep=2)

    assert [checkpoint.step for checkpoint in restarted.list()] == [2, 3]
    restarted.save(trained, step=4)
    assert [checkpoint.step for checkpoint in restarted.list()] == [3, 4]
    assert stored_folders(store, "ckpt") == {"ckpt-3", "ckpt-4"}


@pytest.mark.slow
def test_restore_recovers_weights_and_optimizer(store, trained):
    manager = manager_for(store)
    saved = manager.save(trained, epoch=1)
    fresh = build_model()
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), trained.get_weights()))

    restored = manager.restore(fresh)

    assert restored.step == saved.step == int(trained.optimizer.iterations.numpy())
    assert restored.epoch == 1
    for expected, found in zip(trained.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(found, expected)
    assert int(fresh.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy())
    expected_state = optimizer_state(trained)
    found_state = optimizer_state(fresh)
    assert [role for role, _ in found_state] == [role for role, _ in expected_state]
    assert any(role[-1] == "momentum" for role, _ in found_state)
    for (role, found), (_, expected) in zip(found_state, expected_state):
        np.testing.assert_array_equal(found, expected, err_msg="_".join(role))


def test_restore_on_empty_root_raises_file_not_found(store):
    manager = manager_for(store)

    with pytest.raises(FileNotFoundError, match="No committed checkpoint"):
        manager.restore(build_model())


@pytest.mark.slow
def test_saving_committed_step_raises_unit_exists(store, trained):
    manager = manager_for(store)
    manager.save(trained, step=3)
    weights_before = stored_files(store, "ckpt")

    with pytest.raises(statefs.UnitExistsError, match="already committed"):
        manager.save(trained, step=3)

    assert [checkpoint.step for checkpoint in manager.list()] == [3]
    assert stored_files(store, "ckpt") == weights_before


@pytest.mark.parametrize("max_to_keep", [0, -1, "3", True])
def test_invalid_max_to_keep_raises_value_error(store, max_to_keep):
    with pytest.raises(ValueError, match=re.escape(f"max_to_keep={max_to_keep!r}")):
        manager_for(store, max_to_keep=max_to_keep)


class _FailingWriter:
    """A file object that passes `limit` bytes to `handle`, then fails like a dropped connection."""

    def __init__(self, handle, limit: int):
        self.handle = handle
        self.remaining = limit

    def write(self, data: bytes) -> int:
        if len(data) > self.remaining:
            self.handle.write(data[: self.remaining])
            raise ConnectionResetError("connection reset by peer during upload")
        self.remaining -= len(data)
        return self.handle.write(data)


def fail_payload_writes(monkeypatch, manager: statefs.CheckpointManager, limit: int = 1024) -> None:
    """Make the manager's uploads fail after `limit` bytes.

    The claim and the manifest go through `create_exclusive`, so they still succeed.
    """
    original = manager.backend.open_write

    @contextlib.contextmanager
    def open_write(path):
        with original(path) as handle:
            yield _FailingWriter(handle, limit)

    monkeypatch.setattr(manager.backend, "open_write", open_write)


@pytest.mark.slow
def test_failed_upload_commits_no_checkpoint(store, trained, monkeypatch):
    manager = manager_for(store)
    fail_payload_writes(monkeypatch, manager)

    with pytest.raises(ConnectionResetError):
        manager.save(trained, step=5)

    assert manager.list() == []
    assert manager_for(store).latest() is None
    files = stored_files(store, "ckpt")
    assert not any(relative.endswith(MANIFEST) for relative in files)
    assert f"ckpt-5/{WEIGHTS}" not in files


@pytest.mark.slow
def test_save_after_failed_upload_replaces_fragment(store, trained, monkeypatch):
    manager = manager_for(store)
    fail_payload_writes(monkeypatch, manager)
    with pytest.raises(ConnectionResetError):
        manager.save(trained, step=5)
    monkeypatch.undo()

    manager.save(trained, step=5)

    assert [checkpoint.step for checkpoint in manager.list()] == [5]


def record_saves(monkeypatch, manager: statefs.CheckpointManager) -> list[tuple[statefs.Checkpoint, list]]:
    """Return a list that collects each Checkpoint `manager.save` returns, with the weights it saved."""
    returned = []
    original = manager.save

    def save(model, **kwargs):
        checkpoint = original(model, **kwargs)
        returned.append((checkpoint, model.get_weights()))
        return checkpoint

    monkeypatch.setattr(manager, "save", save)
    return returned


CHILD_RESTORE = """
    import json, sys
    sys.path.insert(0, {tests_dir!r})
    import fsspec
    import statefs
    from conftest import build_model

    fs, root = fsspec.core.url_to_fs({url!r})
    listed = {{path[len(root.rstrip("/")) + 1:]: info["size"] for path, info in fs.find(root, detail=True).items()}}
    manager = statefs.CheckpointManager({url!r})
    restored = {{}}
    for checkpoint in manager.list():
        model = build_model()
        manager.restore(model, checkpoint.step)
        restored[checkpoint.step] = [weight.tolist() for weight in model.get_weights()]
    print(json.dumps({{"listed": listed, "restored": restored}}))
"""


@pytest.mark.slow
def test_checkpoints_load_in_new_process(shared_store, digits, run_fresh, monkeypatch):
    x, y, _, _ = digits
    model = build_model()
    manager = manager_for(shared_store)
    returned = record_saves(monkeypatch, manager)

    model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[manager.callback()])

    assert len(returned) == 2
    files = stored_files(shared_store, "ckpt")
    for checkpoint, _ in returned:
        assert files[f"ckpt-{checkpoint.step}/{WEIGHTS}"] > 0
        assert files[f"ckpt-{checkpoint.step}/{MANIFEST}"] > 0

    output = json.loads(run_fresh(CHILD_RESTORE.format(tests_dir=TESTS_DIR, url=manager.url), shared_store))

    for checkpoint, weights in returned:
        assert output["listed"][f"ckpt-{checkpoint.step}/{WEIGHTS}"] > 0
        restored = output["restored"][str(checkpoint.step)]
        for expected, found in zip(weights, restored, strict=True):
            np.testing.assert_array_equal(np.asarray(found, dtype=expected.dtype), expected)


@pytest.mark.slow
def test_failed_write_in_fit_commits_nothing(shared_store, digits, monkeypatch):
    x, y, _, _ = digits
    model = build_model()
    manager = manager_for(shared_store)
    returned = record_saves(monkeypatch, manager)
    fail_payload_writes(monkeypatch, manager)

    with pytest.raises(ConnectionResetError):
        model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[manager.callback()])

    assert returned == []
    assert manager_for(shared_store).list() == []
    files = stored_files(shared_store, "ckpt")
    assert not any(relative.endswith(MANIFEST) for relative in files)
    assert not any(relative.endswith(WEIGHTS) for relative in files)
