"""Keras callbacks that save through statefs."""

from __future__ import annotations

import keras


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a checkpoint through a CheckpointManager at the end of every epoch.

    Example:

    ```python
    ckpts = statefs.CheckpointManager("s3://bucket/run/ckpt", max_to_keep=5)
    model.fit(x, y, epochs=10, callbacks=[ckpts.callback()])
    ```
    """

    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def on_epoch_end(self, epoch, logs=None):
        self.manager.save(self.model, epoch=epoch + 1, metrics=logs)
