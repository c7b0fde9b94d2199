"""CheckpointManager: per-epoch saves, the checkpoint format, background saves, rotation, restore, failures."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import re
import threading

import numpy as np
import pytest

import statefs
from conftest import FailingWriter, build_model, stored_files

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "statefs-manifest.json"
STATE = "state.bin"
INDEX = "state.json"


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
        assert files[f"ckpt-{step}/{STATE}"] > 0


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


def fail_payload_writes(monkeypatch, manager: statefs.CheckpointManager, limit: int = 1024) -> None:
    """Make the manager's uploads fail after `limit` bytes.

    The claim and the manifest go through `create_exclusive`, so they still succeed.
    """
    original = manager.backend.open_write

    @contextlib.contextmanager
    def open_write(path):
        with original(path) as handle:
            yield FailingWriter(handle, limit)

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
    assert f"ckpt-5/{STATE}" not in files


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
        assert files[f"ckpt-{checkpoint.step}/{STATE}"] > 0
        assert files[f"ckpt-{checkpoint.step}/{MANIFEST}"] > 0

    output = json.loads(run_fresh(CHILD_RESTORE.format(tests_dir=TESTS_DIR, url=manager.url), shared_store))

    for checkpoint, weights in returned:
        assert output["listed"][f"ckpt-{checkpoint.step}/{STATE}"] > 0
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
    assert not any(relative.endswith(STATE) for relative in files)


# The checkpoint format: state.bin, its index state.json, and the manifest.


def local_manager(tmp_path, **kwargs) -> statefs.CheckpointManager:
    return statefs.CheckpointManager(str(tmp_path / "ckpt"), **kwargs)


def named_model(hidden_units: int = 16):
    """Return a compiled classifier whose layers have fixed names, so error messages can be matched."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden_units, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fitted_model(digits):
    """Return a new classifier trained on two batches, so its optimizer has slots.

    Unlike `trained`, a test may change it.
    """
    x, y, _, _ = digits
    model = build_model()
    model.fit(x[:128], y[:128], epochs=1, batch_size=64, verbose=0)
    return model


def all_variables(model) -> list:
    return [*model.variables, *model.optimizer.variables]


def values_of(variables) -> list[np.ndarray]:
    return [np.array(variable.numpy(), copy=True) for variable in variables]


def test_unit_contains_state_index_and_manifest(store, trained):
    manager_for(store).save(trained, step=1)

    assert set(stored_files(store, "ckpt/ckpt-1")) == {STATE, INDEX, MANIFEST, ".statefs-claim"}


def test_state_index_describes_every_byte(tmp_path, trained):
    local_manager(tmp_path).save(trained, step=1)
    unit = tmp_path / "ckpt" / "ckpt-1"

    index = json.loads((unit / INDEX).read_text())

    entries = index["variables"]
    assert [entry["name"] for entry in entries if entry["group"] == "model"] == [v.path for v in trained.variables]
    assert [entry["name"] for entry in entries if entry["group"] == "optimizer"] == [
        v.path for v in trained.optimizer.variables
    ]
    offsets = [entry["offset"] for entry in entries]
    assert offsets == [sum(entry["size"] for entry in entries[:i]) for i in range(len(entries))]
    assert sum(entry["size"] for entry in entries) == (unit / STATE).stat().st_size
    assert index["position"]["step"] == 1


def test_extra_state_round_trips_as_json(tmp_path, trained):
    manager = local_manager(tmp_path)
    extra = {
        "data": {"shard": 3, "offsets": [0, 128, 256]},
        "scale": np.float32(0.5),
        "seen": np.int64(7),
        "order": np.arange(4),
    }
    manager.save(trained, step=1, extra=extra)

    restored = manager.restore(build_model())

    assert restored.extra == {
        "data": {"shard": 3, "offsets": [0, 128, 256]},
        "scale": 0.5,
        "seen": 7,
        "order": [0, 1, 2, 3],
    }
    assert type(restored.extra["seen"]) is int
    assert type(restored.extra["scale"]) is float
    assert type(restored.extra["order"]) is list


@pytest.mark.parametrize("blocking", [True, False])
def test_unserializable_extra_raises_type_error(tmp_path, trained, blocking):
    manager = local_manager(tmp_path)

    with pytest.raises(TypeError, match="JSON-serializable"):
        manager.save(trained, step=1, extra={"callback": object()}, blocking=blocking)

    manager.wait()
    assert manager.list() == []
    assert not (tmp_path / "ckpt" / "ckpt-1").exists()


def test_epoch_and_batch_round_trip(tmp_path, trained):
    manager = local_manager(tmp_path)
    manager.save(trained, step=7, epoch=3, batch=5)

    listed = local_manager(tmp_path).latest()
    restored = manager.restore(build_model())

    assert (listed.epoch, listed.batch) == (3, 5)
    assert (restored.epoch, restored.batch) == (3, 5)


def test_restore_other_architecture_raises_value_error(tmp_path, digits):
    x, y, _, _ = digits
    saved = named_model(hidden_units=16)
    saved.fit(x[:64], y[:64], epochs=1, batch_size=64, verbose=0)
    manager = local_manager(tmp_path)
    manager.save(saved, step=1)
    other = named_model(hidden_units=32)
    before = values_of(other.variables)

    with pytest.raises(ValueError, match="hidden/kernel") as raised:
        manager.restore(other)

    assert "float32[64, 16]" in str(raised.value)
    assert "float32[64, 32]" in str(raised.value)
    for expected, found in zip(before, values_of(other.variables), strict=True):
        np.testing.assert_array_equal(found, expected)


# Damaged state is caught before anything is assigned.


def damage_state(store, change) -> None:
    fs = store.fs()
    path = store.path("ckpt", "ckpt-1", STATE)
    fs.pipe_file(path, change(fs.cat_file(path)))


def flip_middle_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def test_flipped_state_byte_raises_integrity_error(store, trained):
    manager = manager_for(store)
    manager.save(trained, step=1)
    damage_state(store, flip_middle_byte)
    fresh = build_model()
    before = values_of(fresh.variables)

    with pytest.raises(statefs.IntegrityError, match="crc32c") as raised:
        manager.restore(fresh)

    assert raised.value.url.endswith(f"ckpt-1/{STATE}")
    for expected, found in zip(before, values_of(fresh.variables), strict=True):
        np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_truncated_state_raises_integrity_error(store, trained, verify_checksums):
    manager = manager_for(store)
    manager.save(trained, step=1)
    size = stored_files(store, "ckpt/ckpt-1")[STATE]
    damage_state(store, cut_in_half)
    fresh = build_model()
    before = values_of(fresh.variables)

    with pytest.raises(statefs.IntegrityError, match="size") as raised:
        manager.restore(fresh, verify_checksums=verify_checksums)

    assert (raised.value.expected, raised.value.found) == (size, size // 2)
    for expected, found in zip(before, values_of(fresh.variables), strict=True):
        np.testing.assert_array_equal(found, expected)


# Saves in the background.

# Long enough for any upload of these tiny models. A gate that is never
# released makes its test fail after this many seconds instead of hanging the run.
GATE_TIMEOUT = 30.0


class UploadGate:
    """A patch of one manager's `open_write` that blocks every payload upload until `release()`.

    A background save stays in flight while its upload is held.
    """

    def __init__(self, manager: statefs.CheckpointManager, monkeypatch, error: BaseException | None = None):
        self.entered = threading.Event()
        self.released = threading.Event()
        original = manager.backend.open_write

        @contextlib.contextmanager
        def open_write(path):
            self.entered.set()
            if not self.released.wait(GATE_TIMEOUT):
                raise TimeoutError(f"the test never released the upload of {path}")
            if error is not None:
                raise error
            with original(path) as handle:
                yield handle

        monkeypatch.setattr(manager.backend, "open_write", open_write)

    def wait_entered(self) -> None:
        assert self.entered.wait(GATE_TIMEOUT), "the background save never started its upload"

    def release(self) -> None:
        self.released.set()

    def release_after(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self.release)
        timer.daemon = True
        timer.start()


@pytest.fixture
def hold_uploads(monkeypatch):
    """Return a function that puts an UploadGate on a manager. Every gate is released when the test ends."""
    gates: list[UploadGate] = []

    def hold(manager, error=None) -> UploadGate:
        gate = UploadGate(manager, monkeypatch, error)
        gates.append(gate)
        return gate

    yield hold
    for gate in gates:
        gate.release()


def test_background_save_returns_future(tmp_path, trained):
    manager = local_manager(tmp_path)

    future = manager.save(trained, step=1, blocking=False)

    assert isinstance(future, concurrent.futures.Future)
    checkpoint = future.result(timeout=GATE_TIMEOUT)
    assert isinstance(checkpoint, statefs.Checkpoint)
    assert checkpoint.step == 1
    assert [listed.step for listed in manager.list()] == [1]


def test_background_save_keeps_state_at_call(tmp_path, digits, hold_uploads):
    x, y, _, _ = digits
    model = fitted_model(digits)
    manager = local_manager(tmp_path)
    gate = hold_uploads(manager)
    at_call = values_of(all_variables(model))

    future = manager.save(model, step=1, blocking=False)
    gate.wait_entered()
    model.fit(x[:64], y[:64], epochs=1, batch_size=32, verbose=0)
    for variable in all_variables(model):
        variable.assign(np.full(variable.shape, 3, dtype=variable.dtype))
    gate.release()
    future.result(timeout=GATE_TIMEOUT)

    restored = build_model()
    manager.restore(restored)
    found = values_of(all_variables(restored))
    assert len(found) == len(at_call)
    for variable, expected, value in zip(all_variables(restored), at_call, found):
        np.testing.assert_array_equal(value, expected, err_msg=variable.path)


def test_latest_moves_only_after_background_commit(tmp_path, trained, hold_uploads):
    manager = local_manager(tmp_path)
    manager.save(trained, step=1)
    gate = hold_uploads(manager)

    future = manager.save(trained, step=2, blocking=False)
    gate.wait_entered()

    assert manager.latest().step == 1
    assert [checkpoint.step for checkpoint in local_manager(tmp_path).list()] == [1]
    gate.release()
    future.result(timeout=GATE_TIMEOUT)
    assert manager.latest().step == 2


@pytest.mark.parametrize("next_call", ["save", "wait"])
def test_failed_background_save_raises_later(store, trained, hold_uploads, next_call):
    manager = manager_for(store)
    gate = hold_uploads(manager, error=OSError(errno.ENOSPC, "No space left on device"))
    manager.save(trained, step=5, blocking=False)
    gate.release()

    with pytest.raises(OSError) as raised:
        if next_call == "save":
            manager.save(trained, step=6)
        else:
            manager.wait()

    assert type(raised.value) is OSError
    assert raised.value.errno == errno.ENOSPC
    assert any(manager.url in note for note in getattr(raised.value, "__notes__", []))
    assert manager.list() == []
    assert stored_files(store, "ckpt") == {}


def test_failed_background_save_logged(tmp_path, trained, hold_uploads, caplog):
    manager = local_manager(tmp_path)
    gate = hold_uploads(manager, error=OSError(errno.ENOSPC, "No space left on device"))
    manager.save(trained, step=5, blocking=False)
    gate.release()

    # close() joins the writing thread, so its failure has been logged by then.
    with pytest.raises(OSError):
        manager.close()

    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert manager.url in errors[0].getMessage()
    assert "No space left on device" in errors[0].getMessage()


def test_second_background_save_waits_for_first(tmp_path, trained, hold_uploads, monkeypatch):
    from statefs import training_state

    manager = local_manager(tmp_path, max_in_flight=1)
    gate = hold_uploads(manager)
    captures = []
    original_init = training_state.CapturedState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        captures.append(self.position.step)

    monkeypatch.setattr(training_state.CapturedState, "__init__", init)
    captured_at_release = []

    def release():
        captured_at_release.extend(captures)
        gate.release()

    first = manager.save(trained, step=1, blocking=False)
    gate.wait_entered()
    threading.Timer(0.5, release).start()

    second = manager.save(trained, step=2, blocking=False)

    assert gate.released.is_set(), "the second save returned while the first was still being written"
    assert captured_at_release == [1]
    assert first.result(timeout=GATE_TIMEOUT).step == 1
    assert second.result(timeout=GATE_TIMEOUT).step == 2


@pytest.mark.parametrize("flush", ["wait", "close", "with"])
def test_flush_commits_background_save(tmp_path, trained, hold_uploads, flush):
    manager = local_manager(tmp_path)
    gate = hold_uploads(manager)

    if flush == "with":
        with manager:
            future = manager.save(trained, step=1, blocking=False)
            gate.release_after(0.3)
    else:
        future = manager.save(trained, step=1, blocking=False)
        gate.release_after(0.3)
        getattr(manager, flush)()

    assert future.done()
    assert [checkpoint.step for checkpoint in local_manager(tmp_path).list()] == [1]


def test_with_block_keeps_own_error(tmp_path, trained, hold_uploads, caplog):
    manager = local_manager(tmp_path)
    gate = hold_uploads(manager, error=OSError(errno.ENOSPC, "No space left on device"))

    with pytest.raises(KeyboardInterrupt):
        with manager:
            manager.save(trained, step=1, blocking=False)
            gate.release()
            raise KeyboardInterrupt

    messages = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert any("while the block raised" in message and "No space left" in message for message in messages)


def test_taken_step_suggests_step_argument(tmp_path, trained):
    manager = local_manager(tmp_path)
    manager.save(trained, step=3)

    with pytest.raises(statefs.UnitExistsError, match=r"already committed.*Pass save\(step=\.\.\.\)"):
        manager.save(trained, step=3)


def test_new_save_rotated_away_warns(tmp_path, trained, caplog):
    manager = local_manager(tmp_path, max_to_keep=2)
    for step in (40, 50):
        manager.save(trained, step=step)

    with caplog.at_level(logging.WARNING, logger="statefs.checkpoints"):
        manager.save(trained, step=2)

    assert [checkpoint.step for checkpoint in manager.list()] == [40, 50]
    assert any("Checkpoint 2 was deleted right after its save" in record.getMessage() for record in caplog.records)


# Retention through the manager.


def save_with_losses(manager, model, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        manager.save(model, step=step, metrics={"loss": loss})


def test_keep_best_keeps_best_and_newest(store, trained):
    manager = manager_for(store, max_to_keep=1, keep=[statefs.KeepBest(1, "loss")])

    save_with_losses(manager, trained, {1: 0.5, 2: 0.2, 3: 0.4, 4: 0.3})

    assert [checkpoint.step for checkpoint in manager.list()] == [2, 4]
    assert stored_folders(store, "ckpt") == {"ckpt-2", "ckpt-4"}


def test_keep_every_keeps_one_per_interval(tmp_path, trained):
    manager = local_manager(tmp_path, max_to_keep=1, keep=[statefs.KeepEvery(steps=3)])

    for step in range(8):
        manager.save(trained, step=step)

    assert [checkpoint.step for checkpoint in manager.list()] == [0, 3, 6, 7]


def test_restarted_manager_keeps_best_checkpoint(tmp_path, trained):
    policies = {"max_to_keep": 1, "keep": [statefs.KeepBest(1, "loss")]}
    save_with_losses(local_manager(tmp_path, **policies), trained, {1: 0.1, 2: 0.5, 3: 0.6})

    restarted = local_manager(tmp_path, **policies)
    save_with_losses(restarted, trained, {4: 0.7})

    assert [checkpoint.step for checkpoint in restarted.list()] == [1, 4]


def test_foreign_entries_kept_and_warned_once(store, trained, caplog):
    fs = store.fs()
    if store.backend == "file":
        fs.makedirs(store.path("ckpt", "exported"), exist_ok=True)
    fs.pipe_file(store.path("ckpt", "notes.txt"), b"run notes")
    fs.pipe_file(store.path("ckpt", "exported", "model.bin"), b"exported model")
    manager = manager_for(store, max_to_keep=1)

    with caplog.at_level(logging.WARNING, logger="statefs.checkpoints"):
        for step in (1, 2, 3):
            manager.save(trained, step=step)

    files = stored_files(store, "ckpt")
    assert files["notes.txt"] == len(b"run notes")
    assert files["exported/model.bin"] == len(b"exported model")
    assert [checkpoint.step for checkpoint in manager.list()] == [3]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "notes.txt" in warnings[0]
    assert "exported" in warnings[0]


# Checkpoints written by statefs 0.1.


def test_keras_weights_checkpoint_still_restores(store, trained, tmp_path):
    from statefs import backends
    from statefs.commit import UnitWriter

    local_file = tmp_path / "checkpoint.weights.h5"
    trained.save_weights(str(local_file))
    backend, path = backends.resolve(store.url("ckpt", "ckpt-3"), store.storage_options)
    writer = UnitWriter(backend, path, kind="checkpoint", metadata={"step": 3, "epoch": 1, "metrics": {"loss": 0.4}})
    with writer.claimed():
        writer.put_file(str(local_file), "checkpoint.weights.h5")
        writer.commit()
    fresh = build_model()

    restored = manager_for(store).restore(fresh)

    assert (restored.step, restored.epoch, restored.extra) == (3, 1, {})
    for expected, found in zip(trained.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(found, expected)
    assert int(fresh.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy())
