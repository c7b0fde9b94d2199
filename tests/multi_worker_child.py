"""One worker of a two-worker `MultiWorkerMirroredStrategy` run that saves a checkpoint.

`tests/test_multi_worker.py` starts two of these with `TF_CONFIG` naming a
cluster of two workers on 127.0.0.1. Each worker trains a small digits
classifier with a custom training loop, because Keras 3.15 `fit` fails
under this strategy. Then each worker calls `CheckpointManager.save` on the
same URL and restores the latest checkpoint into a freshly built model.

Usage: multi_worker_child.py URL {save,fail-chief-upload} [TRAINED_WEIGHTS_FILE]

Every write method of the non-chief's backend raises, so any attempt of
that worker to write to the store fails its save. In `fail-chief-upload`
mode every payload upload of the chief raises PermissionError as well, as a
read-only store would. Its claim still succeeds, so the chief has a
fragment to clean up.

The worker writes one JSON line to stdout: its task, whether it is the
chief, a digest of the trained state, and either the digest of the restored
state or the error that `save` raised. With TRAINED_WEIGHTS_FILE, the chief
also saves the trained state there with plain Keras, so the parent can save
the same state from a single process and compare.

The parent imports `build_model` and `state_digest` from here; the strategy
is created in `main` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import keras
import numpy as np
import tensorflow as tf

import statefs
from statefs import distribute

GLOBAL_BATCH_SIZE = 64
TRAIN_SAMPLES = 512
PAYLOAD_WRITES = ("open_write", "write_bytes")
ALL_WRITES = (*PAYLOAD_WRITES, "create_exclusive", "delete", "delete_tree")


def build_model():
    """Return the digits classifier; fixed names give its variables the same paths in every build."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ],
        name="digits",
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01, name="adam"), loss="sparse_categorical_crossentropy")
    return model


def digits_dataset():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data[:TRAIN_SAMPLES] / 16.0).astype("float32")
    y = data.target[:TRAIN_SAMPLES].astype("int64")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH_SIZE)
    # Arrays have no files to shard by, so each worker takes every other batch element.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def train(strategy, model) -> None:
    """Run one epoch of a custom training loop; the strategy sums every replica's gradients across workers."""
    loss_function = keras.losses.SparseCategoricalCrossentropy(reduction="none")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            losses = loss_function(y, model(x, training=True))
            loss = tf.nn.compute_average_loss(losses, global_batch_size=GLOBAL_BATCH_SIZE)
        gradients = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    @tf.function
    def train_step(batch):
        strategy.run(replica_step, args=batch)

    for batch in strategy.experimental_distribute_dataset(digits_dataset()):
        train_step(batch)


def state_digest(model) -> dict[str, str]:
    """Return {variable path: SHA-256 of dtype, shape and values} for every weight and optimizer variable."""
    digest = {}
    for variable in [*model.weights, *model.optimizer.variables]:
        value = np.asarray(variable.numpy())
        content = f"{value.dtype}{value.shape}".encode() + value.tobytes()
        digest[variable.path] = hashlib.sha256(content).hexdigest()
    return digest


def reject_writes(backend, names: tuple[str, ...], reason: str) -> None:
    """Replace the backend's write methods in `names` with ones that raise PermissionError."""

    def rejected(path, *args, **kwargs):
        raise PermissionError(f"{reason}: cannot write {path}")

    @contextlib.contextmanager
    def rejected_open_write(path):
        rejected(path)
        yield

    for name in names:
        setattr(backend, name, rejected_open_write if name == "open_write" else rejected)


def main(url: str, mode: str, trained_weights_file: str | None) -> None:
    # The strategy must exist before TensorFlow runs any operation.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
        context_in_scope = distribute.worker_context()
    train(strategy, model)
    context = distribute.worker_context(model)
    report = {
        "task": context.task,
        "task_in_scope": context_in_scope.task,
        "is_chief": context.is_chief,
        "trained": state_digest(model),
        "step": int(model.optimizer.iterations.numpy()),
    }
    if context.is_chief and trained_weights_file:
        model.save_weights(trained_weights_file)

    manager = statefs.CheckpointManager(url)
    if not context.is_chief:
        reject_writes(manager.backend, ALL_WRITES, f"Worker {context.task} is not the chief")
    elif mode == "fail-chief-upload":
        reject_writes(manager.backend, PAYLOAD_WRITES, "Injected failure: the store is read-only")
    try:
        manager.save(model, step=report["step"])
    except (OSError, RuntimeError, ValueError, tf.errors.OpError) as error:
        report["error"] = {"type": type(error).__name__, "message": str(error)}
        print(json.dumps(report), flush=True)
        return

    with strategy.scope():
        restored = build_model()
    manager.restore(restored)
    report["restored"] = state_digest(restored)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
