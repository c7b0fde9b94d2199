"""ModelCheckpoint: Keras's checkpoint callback on every backend, with retention and early checks."""

from __future__ import annotations

import json
import logging
import uuid

import keras
import numpy as np
import pytest

import statefs
from conftest import build_model, stored_files
from statefs.model_checkpoint import WRITER, ModelCheckpoint
from statefs.retention import KeepBest
from statefs.snapshots import SIDECAR_SUFFIX

BATCH_SIZE = 64


class BatchCounter(keras.callbacks.Callback):
    """A callback that counts the training batches that began."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.batches += 1


def fit(model, digits, callbacks, *, epochs=1, validation=True, **options):
    x, y, x_test, y_test = digits
    if validation:
        options["validation_data"] = (x_test, y_test)
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    return model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=0, callbacks=callbacks, **options)


def drive(callback, model, epoch_logs, *, first_epoch=0):
    """Run the callback's hooks as fit() would, with the given logs at each epoch's end."""
    callback.set_model(model)
    callback.on_train_begin()
    for offset, logs in enumerate(epoch_logs):
        callback.on_epoch_begin(first_epoch + offset)
        callback.on_epoch_end(first_epoch + offset, dict(logs))


def checkpoint_names(store, folder="ckpt") -> set[str]:
    """Return the checkpoint files (sidecars left out) that a new filesystem instance lists."""
    return {name for name in stored_files(store, folder) if not name.endswith(SIDECAR_SUFFIX)}


def sidecar_metadata(store, *parts) -> dict:
    data = store.fs().cat_file(store.path(*parts) + SIDECAR_SUFFIX)
    return json.loads(data)["metadata"]


def options(store) -> dict:
    return {"storage_options": store.storage_options}


@pytest.fixture
def memory() -> str:
    """A unique, empty memory:// root, for tests whose behaviour does not depend on the store."""
    return f"memory://model-checkpoint-{uuid.uuid4().hex[:8]}"


def names_under(url: str) -> set[str]:
    """Return the files under `url` other than sidecars, relative to it."""
    backend, path = statefs.backends.resolve(url)
    root = path.rstrip("/") + "/"
    return {found[len(root):] for found in backend.fs.find(path) if not found.endswith(SIDECAR_SUFFIX)}


def metadata_at(url: str) -> dict:
    backend, path = statefs.backends.resolve(url)
    return json.loads(backend.read_bytes(path + SIDECAR_SUFFIX))["metadata"]


def weights_equal(first, second) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


# File names and formats.


def test_template_fills_epoch_and_val_loss(store, digits):
    model = build_model()
    callback = ModelCheckpoint(store.url("ckpt", "digits-{epoch:02d}-{val_loss:.3f}.keras"), **options(store))

    history = fit(model, digits, callback, epochs=2)

    names = [f"digits-{epoch:02d}-{loss:.3f}.keras" for epoch, loss in enumerate(history.history["val_loss"], 1)]
    assert checkpoint_names(store) == set(names)
    loaded = [statefs.load_snapshot(store.url("ckpt", name), **options(store)) for name in names]
    assert all(isinstance(snapshot, keras.Model) for snapshot in loaded)
    assert weights_equal(loaded[-1], model)
    assert not weights_equal(loaded[0], model)


def test_saved_files_pass_verify(store, trained):
    callback = ModelCheckpoint(store.url("ckpt", "{epoch}.keras"), **options(store))
    drive(callback, trained, [{"loss": 0.5, "val_loss": 0.6}] * 2)

    report = statefs.verify(store.url("ckpt"), **options(store))

    assert report.ok, report.problems
    assert len(report.snapshots) == 2


def test_sidecar_records_epoch_step_and_metrics(memory, digits):
    model = build_model()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.keras")

    history = fit(model, digits, callback, epochs=2)

    metadata = metadata_at(f"{memory}/ckpt/2.keras")
    assert metadata["writer"] == WRITER
    assert metadata["epoch"] == 2
    assert metadata["batch"] is None
    assert metadata["step"] == int(model.optimizer.iterations.numpy())
    assert metadata["metrics"]["val_loss"] == pytest.approx(history.history["val_loss"][-1])
    assert metadata["format"] == "keras"


def test_save_weights_only_writes_weights_file(tmp_path, digits):
    model = build_model()
    url = str(tmp_path / "ckpt" / "{epoch}.weights.h5")
    callback = ModelCheckpoint(url, save_weights_only=True)
    fit(model, digits, callback, validation=False)

    fresh = build_model()
    statefs.load_snapshot(str(tmp_path / "ckpt" / "1.weights.h5"), model=fresh)

    assert weights_equal(fresh, model)
    assert int(fresh.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


def test_integer_save_freq_fills_batch(memory, digits):
    model = build_model()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{batch:03d}}.weights.h5", save_weights_only=True, save_freq=10)

    fit(model, digits, callback, epochs=2, validation=False)

    # 1500 samples in batches of 64 make 24 batches an epoch. The count of
    # batches runs on across the epoch boundary, as in Keras.
    assert names_under(f"{memory}/ckpt") == {
        "1-010.weights.h5",
        "1-020.weights.h5",
        "2-006.weights.h5",
        "2-016.weights.h5",
    }


def test_integer_save_freq_records_step(memory, digits):
    model = build_model()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{batch}}.weights.h5", save_weights_only=True, save_freq=10)

    fit(model, digits, callback, validation=False)

    metadata = metadata_at(f"{memory}/ckpt/20.weights.h5")
    assert metadata["step"] == 20
    assert metadata["batch"] == 20
    assert "val_loss" not in metadata["metrics"]


def test_fixed_name_is_replaced_by_each_save(store, trained):
    callback = ModelCheckpoint(store.url("ckpt", "latest.keras"), **options(store))

    drive(callback, trained, [{"loss": 0.5, "val_loss": 0.6}, {"loss": 0.4, "val_loss": 0.3}])

    assert checkpoint_names(store) == {"latest.keras"}
    assert sidecar_metadata(store, "ckpt", "latest.keras")["epoch"] == 2


def test_verbose_prints_one_line_per_save(memory, capsys, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.keras", verbose=1)

    drive(callback, trained, [{"loss": 0.5, "val_loss": 0.6}] * 2)

    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == [
        f"Epoch 1: saving the model to {memory}/ckpt/1.keras",
        f"Epoch 2: saving the model to {memory}/ckpt/2.keras",
    ]


def test_verbose_reports_best_only_decisions(memory, capsys, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/best.keras", save_best_only=True, verbose=1)

    drive(callback, trained, [{"loss": 1.0, "val_loss": v} for v in (0.5, 0.6)])

    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == [
        f"Epoch 1: val_loss improved from none to 0.50000; saving the model to {memory}/ckpt/best.keras",
        "Epoch 2: val_loss did not improve on 0.50000",
    ]


# save_best_only.


def test_best_only_saves_improvements_only(memory, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.keras", monitor="val_loss", save_best_only=True)

    drive(callback, trained, [{"loss": 1.0, "val_loss": v} for v in (0.5, 0.7, 0.4, 0.4)])

    assert names_under(f"{memory}/ckpt") == {"1.keras", "3.keras"}
    assert callback.best == 0.4


def test_best_only_max_mode_keeps_highest(memory, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.keras", monitor="val_accuracy", save_best_only=True)

    drive(callback, trained, [{"loss": 1.0, "val_accuracy": v} for v in (0.5, 0.4, 0.9)])

    assert names_under(f"{memory}/ckpt") == {"1.keras", "3.keras"}


def test_initial_value_threshold_blocks_worse_saves(memory, trained):
    callback = ModelCheckpoint(
        f"{memory}/ckpt/{{epoch}}.keras", monitor="val_loss", save_best_only=True, initial_value_threshold=0.4
    )

    drive(callback, trained, [{"loss": 1.0, "val_loss": v} for v in (0.5, 0.45, 0.3)])

    assert names_under(f"{memory}/ckpt") == {"3.keras"}


def test_best_survives_restart(store, trained):
    url = store.url("ckpt", "best.keras")
    drive(ModelCheckpoint(url, save_best_only=True, **options(store)), trained, [{"loss": 1.0, "val_loss": 0.3}])
    saved = store.fs().cat_file(store.path("ckpt", "best.keras"))

    restarted = ModelCheckpoint(url, save_best_only=True, **options(store))
    drive(restarted, trained, [{"loss": 1.0, "val_loss": 0.4}])

    assert restarted.best == 0.3
    assert store.fs().cat_file(store.path("ckpt", "best.keras")) == saved
    assert sidecar_metadata(store, "ckpt", "best.keras")["epoch"] == 1


def test_best_survives_restart_of_fit(tmp_path, digits):
    url = str(tmp_path / "ckpt" / "best.keras")
    history = fit(build_model(), digits, ModelCheckpoint(url, save_best_only=True), epochs=2)
    best = min(history.history["val_loss"])
    saved = (tmp_path / "ckpt" / "best.keras").read_bytes()

    # build_model() seeds the RNG, so one epoch trains the weights of the
    # first run's first epoch, which are worse than those after two.
    restarted = ModelCheckpoint(url, save_best_only=True)
    second_history = fit(build_model(), digits, restarted, epochs=1)

    assert second_history.history["val_loss"][0] > best
    assert restarted.best == pytest.approx(best)
    assert (tmp_path / "ckpt" / "best.keras").read_bytes() == saved


def test_restart_saves_a_better_model(store, trained):
    url = store.url("ckpt", "best-{epoch}.keras")
    drive(ModelCheckpoint(url, save_best_only=True, **options(store)), trained, [{"loss": 1.0, "val_loss": 0.3}])

    restarted = ModelCheckpoint(url, save_best_only=True, **options(store))
    drive(restarted, trained, [{"loss": 1.0, "val_loss": 0.35}, {"loss": 1.0, "val_loss": 0.2}], first_epoch=1)

    assert checkpoint_names(store) == {"best-1.keras", "best-3.keras"}


def test_threshold_better_than_stored_best_wins(memory, trained):
    url = f"{memory}/ckpt/best-{{epoch}}.keras"
    drive(ModelCheckpoint(url, save_best_only=True), trained, [{"loss": 1.0, "val_loss": 0.3}])

    restarted = ModelCheckpoint(url, save_best_only=True, initial_value_threshold=0.1)
    drive(restarted, trained, [{"loss": 1.0, "val_loss": 0.2}], first_epoch=1)

    assert restarted.best == 0.1


# Retention.


def test_max_to_keep_deletes_oldest(store, trained):
    callback = ModelCheckpoint(store.url("ckpt", "{epoch:02d}.weights.h5"), save_weights_only=True, max_to_keep=2, **options(store))

    drive(callback, trained, [{"loss": 1.0, "val_loss": 0.5}] * 4)

    assert checkpoint_names(store) == {"03.weights.h5", "04.weights.h5"}
    assert set(stored_files(store, "ckpt")) == {
        "03.weights.h5",
        "03.weights.h5" + SIDECAR_SUFFIX,
        "04.weights.h5",
        "04.weights.h5" + SIDECAR_SUFFIX,
    }


def test_rotation_survives_restart(store, trained):
    url = store.url("ckpt", "{epoch:02d}.weights.h5")
    drive(ModelCheckpoint(url, save_weights_only=True, max_to_keep=2, **options(store)), trained, [{"loss": 0.5}] * 2)

    restarted = ModelCheckpoint(url, save_weights_only=True, max_to_keep=2, **options(store))
    drive(restarted, trained, [{"loss": 0.5}], first_epoch=2)

    assert checkpoint_names(store) == {"02.weights.h5", "03.weights.h5"}


def test_rotation_continues_after_fit_restart(memory, digits):
    url = f"{memory}/ckpt/{{epoch:02d}}.weights.h5"
    model = build_model()
    fit(model, digits, ModelCheckpoint(url, save_weights_only=True, max_to_keep=2), epochs=2, validation=False)

    restarted = ModelCheckpoint(url, save_weights_only=True, max_to_keep=2)
    fit(model, digits, restarted, epochs=3, initial_epoch=2, validation=False)

    assert names_under(f"{memory}/ckpt") == {"02.weights.h5", "03.weights.h5"}


def test_keep_best_policy_keeps_best_and_newest(store, trained):
    callback = ModelCheckpoint(
        store.url("ckpt", "{epoch}.weights.h5"),
        save_weights_only=True,
        max_to_keep=1,
        keep=[KeepBest(1, "val_loss")],
        **options(store),
    )

    drive(callback, trained, [{"loss": 1.0, "val_loss": v} for v in (0.6, 0.2, 0.5, 0.7)])

    assert checkpoint_names(store) == {"2.weights.h5", "4.weights.h5"}


def test_keep_best_without_max_to_keep(memory, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.weights.h5", save_weights_only=True, keep=[KeepBest(2, "loss")])

    drive(callback, trained, [{"loss": v} for v in (0.9, 0.3, 0.5, 0.4, 0.8)])

    assert names_under(f"{memory}/ckpt") == {"2.weights.h5", "4.weights.h5", "5.weights.h5"}


def test_without_retention_every_file_stays(memory, trained):
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.weights.h5", save_weights_only=True)

    drive(callback, trained, [{"loss": 0.5}] * 3)

    assert names_under(f"{memory}/ckpt") == {"1.weights.h5", "2.weights.h5", "3.weights.h5"}


def test_foreign_files_are_never_deleted(store, trained, caplog):
    fs = store.fs()
    fs.makedirs(store.path("ckpt"), exist_ok=True)
    fs.pipe_file(store.path("ckpt", "notes.txt"), b"kept")
    # A name that matches the template but has no sidecar, as Keras's own callback writes it.
    fs.pipe_file(store.path("ckpt", "07.weights.h5"), b"from keras")
    # A statefs snapshot that ModelCheckpoint did not write.
    statefs.save_snapshot(trained, store.url("ckpt", "08.weights.h5"), **options(store))
    callback = ModelCheckpoint(store.url("ckpt", "{epoch:02d}.weights.h5"), save_weights_only=True, max_to_keep=1, **options(store))

    with caplog.at_level(logging.WARNING, logger="statefs.model_checkpoint"):
        drive(callback, trained, [{"loss": 0.5}] * 3)

    assert checkpoint_names(store) == {"notes.txt", "07.weights.h5", "08.weights.h5", "03.weights.h5"}
    warnings = [record for record in caplog.records if "not written by this ModelCheckpoint" in record.getMessage()]
    assert len(warnings) == 1
    assert "notes.txt" in warnings[0].getMessage()


def test_other_template_files_not_rotated(memory, trained):
    other = ModelCheckpoint(f"{memory}/ckpt/other-{{epoch}}.weights.h5", save_weights_only=True)
    drive(other, trained, [{"loss": 0.5}] * 2)
    callback = ModelCheckpoint(f"{memory}/ckpt/main-{{epoch}}.weights.h5", save_weights_only=True, max_to_keep=1)

    drive(callback, trained, [{"loss": 0.5}] * 2)

    assert names_under(f"{memory}/ckpt") == {"other-1.weights.h5", "other-2.weights.h5", "main-2.weights.h5"}


# Checks at construction.


def test_best_only_val_metric_batch_freq_rejected(memory, digits):
    counter = BatchCounter()

    with pytest.raises(ValueError, match="exist only at the end of an epoch") as raised:
        callback = ModelCheckpoint(f"{memory}/ckpt/best.keras", monitor="val_loss", save_best_only=True, save_freq=5)
        fit(build_model(), digits, [counter, callback])

    assert "save_freq='epoch'" in str(raised.value)
    assert "'loss'" in str(raised.value)
    assert counter.batches == 0


def test_keep_best_val_metric_batch_freq_rejected(memory):
    with pytest.raises(ValueError, match="exist only at the end of an epoch"):
        ModelCheckpoint(f"{memory}/ckpt/{{batch}}.keras", save_freq=5, keep=[KeepBest(1, "val_loss")])


def test_val_field_batch_freq_rejected(memory):
    with pytest.raises(ValueError, match=r"\{val_loss\}.*only at the end of an epoch"):
        ModelCheckpoint(f"{memory}/ckpt/{{batch}}-{{val_loss:.2f}}.keras", save_freq=5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"filepath": "memory://run/ckpt/model.tf"}, r"must end with \.keras or \.h5"),
        ({"filepath": "memory://run/ckpt/model.keras", "save_weights_only": True}, r"must end with \.weights\.h5"),
        ({"filepath": "memory://run/ckpt/model.weights.h5"}, r"must end with \.keras or \.h5"),
        ({"filepath": "memory://run/{epoch}/model.keras"}, "only in the file name"),
        ({"filepath": "memory://run/ckpt/{}.keras"}, "positional fields"),
        ({"filepath": "memory://run/ckpt/{0}.keras"}, "positional fields"),
        ({"filepath": "memory://run/ckpt/{epoch.real}.keras"}, "plain name"),
        ({"filepath": "memory://run/ckpt/{epoch.keras"}, "Invalid filepath"),
        ({"filepath": "memory://run/ckpt/epoch}.keras"}, "Invalid filepath"),
        ({"filepath": "memory://run/ckpt/{loss:d}.keras"}, "formatting it failed"),
        ({"filepath": "memory://run/ckpt/{epoch}.keras", "save_freq": 0}, "save_freq"),
        ({"filepath": "memory://run/ckpt/{epoch}.keras", "save_freq": "batch"}, "save_freq"),
        ({"filepath": "memory://run/ckpt/{epoch}.keras", "save_freq": True}, "save_freq"),
        ({"filepath": "memory://run/ckpt/{epoch}.keras", "mode": "lowest"}, "mode"),
        ({"filepath": "memory://run/ckpt/{batch}.keras"}, r"\{batch\} needs an integer `save_freq`"),
        ({"filepath": "memory://run/ckpt/m.keras", "max_to_keep": 0}, "max_to_keep"),
        ({"filepath": "memory://run/ckpt/m.keras", "initial_value_threshold": "low"}, "initial_value_threshold"),
    ],
)
def test_invalid_arguments_rejected_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message) as raised:
        ModelCheckpoint(**arguments)

    assert "Received:" in str(raised.value)


def test_keep_rejects_non_policies():
    with pytest.raises(TypeError, match="retention policies"):
        ModelCheckpoint("memory://run/ckpt/m.keras", keep=["best"])


def test_escaped_braces_stay_literal(memory, trained):
    callback = ModelCheckpoint(memory + "/{{tag}}/m-{{{epoch}}}.keras")

    drive(callback, trained, [{"loss": 0.5}])

    assert names_under(memory) == {"{tag}/m-{1}.keras"}


# Checks before the first batch and at the first epoch's end.


def test_unknown_field_rejected_before_training(memory, digits):
    counter = BatchCounter()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{val_los:.2f}}.keras")

    with pytest.raises(ValueError, match=r"Unknown field \{val_los\}") as raised:
        fit(build_model(), digits, [counter, callback])

    assert "val_loss" in str(raised.value)
    assert "Received: filepath=" in str(raised.value)
    assert counter.batches == 0


def test_unknown_monitor_rejected_before_training(memory, digits):
    counter = BatchCounter()
    callback = ModelCheckpoint(f"{memory}/ckpt/best.keras", monitor="val_acc", save_best_only=True)

    with pytest.raises(ValueError, match="Unknown metric 'val_acc'") as raised:
        fit(build_model(), digits, [counter, callback])

    assert "val_accuracy" in str(raised.value)
    assert "Received: monitor='val_acc'" in str(raised.value)
    assert counter.batches == 0


def test_unknown_keep_best_monitor_rejected(memory, digits):
    counter = BatchCounter()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}.keras", max_to_keep=2, keep=[KeepBest(1, "val_los")])

    with pytest.raises(ValueError, match="Unknown metric 'val_los' used as the monitor of KeepBest"):
        fit(build_model(), digits, [counter, callback])

    assert counter.batches == 0


def test_multi_output_names_known_before_training(memory, digits):
    inputs = keras.Input((64,))
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(inputs)
    size = keras.layers.Dense(1, name="size")(inputs)
    model = keras.Model(inputs, [digit, size])
    model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"], metrics=[["accuracy"], ["mae"]])
    counter = BatchCounter()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{digit_accuracy:.2f}}-{{size_mea:.2f}}.keras")
    x, y, _, _ = digits

    with pytest.raises(ValueError, match=r"Unknown field \{size_mea\}") as raised:
        model.fit(x, [y, x.sum(axis=1)], epochs=1, batch_size=BATCH_SIZE, verbose=0, callbacks=[counter, callback])

    assert "size_mae" in str(raised.value)
    assert counter.batches == 0


def test_missing_validation_raises_at_epoch_end(memory, digits):
    counter = BatchCounter()
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{val_loss:.2f}}.keras")

    with pytest.raises(ValueError, match="Epoch 1 ended without validation metrics") as raised:
        fit(build_model(), digits, [counter, callback], epochs=2, validation=False)

    assert "validation_data" in str(raised.value)
    assert counter.batches == 24
    assert names_under(memory) == set()


def test_missing_validation_for_best_only_raises(memory, digits):
    callback = ModelCheckpoint(f"{memory}/ckpt/best.keras", monitor="val_loss", save_best_only=True)

    with pytest.raises(ValueError, match="Epoch 1 ended without validation metrics"):
        fit(build_model(), digits, callback, validation=False)

    assert names_under(memory) == set()


def test_epochs_without_validation_are_skipped(memory, trained):
    # fit(validation_freq=[1, 3]) logs no validation metrics at epoch 2.
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{val_loss:.1f}}.keras")

    drive(callback, trained, [{"loss": 0.5, "val_loss": 0.6}, {"loss": 0.4}, {"loss": 0.3, "val_loss": 0.4}])

    assert names_under(f"{memory}/ckpt") == {"1-0.6.keras", "3-0.4.keras"}


def test_unbuilt_model_field_checked_at_first_save(memory, digits):
    model = keras.Sequential([keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    callback = ModelCheckpoint(f"{memory}/ckpt/{{epoch}}-{{acuracy:.2f}}.keras")

    with pytest.raises(ValueError, match="the logs have no acuracy") as raised:
        fit(model, digits, callback, validation=False)

    assert "Logged names: loss" in str(raised.value)
    assert names_under(memory) == set()
