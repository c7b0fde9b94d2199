"""A custom training loop that stops mid-epoch and resumes from a statefs checkpoint.

Every batch draws noise from four global random generators: Python's
`random`, NumPy's, TensorFlow's and Keras's. The model also has a Dropout
layer. A resume is exact only if all of them and the optimizer come back as
they were.

    python resume_child.py URL full
    python resume_child.py URL stop EPOCH BATCH    # save after BATCH batches of EPOCH, then exit
    python resume_child.py URL resume [--no-rng]   # restore the latest checkpoint and finish

`full` and `resume` print a JSON object with a SHA-256 digest of every model
and optimizer variable once the last epoch is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import statefs

EPOCHS = 3
BATCH_SIZE = 64
SAMPLES = 640


def configure_determinism() -> None:
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data[:SAMPLES] / 16.0).astype("float32"), data.target[:SAMPLES].astype("int64")


def build_model() -> keras.Model:
    keras.utils.set_random_seed(11)
    # With op determinism on, TensorFlow wants the program to create the global generator.
    tf.random.set_global_generator(tf.random.Generator.from_seed(5))
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return model


def noisy(x: np.ndarray) -> np.ndarray:
    """Add noise drawn from all four global generators."""
    noise = np.random.normal(0.0, 0.01, size=x.shape).astype("float32")
    noise += np.float32(random.uniform(-0.01, 0.01))
    noise += tf.random.get_global_generator().normal(x.shape, stddev=0.01).numpy()
    noise += keras.ops.convert_to_numpy(keras.random.normal(x.shape, stddev=0.01))
    return x + noise


def train_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    model.optimizer.apply(gradients, model.trainable_variables)


def digest(model: keras.Model) -> str:
    hasher = hashlib.sha256()
    for variable in list(model.variables) + list(model.optimizer.variables):
        hasher.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes())
    return hasher.hexdigest()


def train(model, manager, start=(0, 0), permutation=None, stop=None) -> bool:
    """Train from (epoch, batch) to the end; with `stop`, save there and return False."""
    x, y = digits()
    batches = SAMPLES // BATCH_SIZE
    for epoch in range(start[0], EPOCHS):
        if permutation is None or epoch != start[0]:
            permutation = np.random.permutation(SAMPLES)
        first = start[1] if epoch == start[0] else 0
        for batch in range(first, batches):
            chosen = permutation[batch * BATCH_SIZE:(batch + 1) * BATCH_SIZE]
            train_step(model, noisy(x[chosen]), y[chosen])
            if stop == (epoch, batch + 1):
                manager.save(model, epoch=epoch, batch=batch + 1, extra={"permutation": permutation})
                return False
    return True


def main(url: str, mode: str, *args: str) -> None:
    configure_determinism()
    model = build_model()
    manager = statefs.CheckpointManager(url, max_to_keep=2)
    if mode == "full":
        train(model, manager)
    elif mode == "stop":
        train(model, manager, stop=(int(args[0]), int(args[1])))
        return
    else:
        checkpoint = manager.restore(model, restore_rng="--no-rng" not in args)
        permutation = np.asarray(checkpoint.extra["permutation"])
        train(model, manager, start=(checkpoint.epoch, checkpoint.batch), permutation=permutation)
    print(json.dumps({"digest": digest(model), "iterations": int(model.optimizer.iterations.numpy())}))


if __name__ == "__main__":
    main(*sys.argv[1:])
