"""Keras callbacks that save through statefs."""

from __future__ import annotations

import logging

import keras

from statefs.model_checkpoint import ModelCheckpoint

__all__ = ["BackupAndRestore", "CheckpointCallback", "ModelCheckpoint"]


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a checkpoint through a CheckpointManager at the end of every epoch.

    Example:

    ```python
    ckpts = statefs.CheckpointManager("s3://bucket/run/ckpt", max_to_keep=5)
    model.fit(x, y, epochs=10, callbacks=[ckpts.callback(blocking=False)])
    ```

    With `blocking=False` each save is written in the background while the
    next epoch trains; training's end waits for the last one.
    """

    def __init__(self, manager, *, blocking: bool = True):
        super().__init__()
        self.manager = manager
        self.blocking = blocking

    def on_epoch_end(self, epoch, logs=None):
        self.manager.save(self.model, epoch=epoch + 1, batch=0, metrics=logs, blocking=self.blocking)

    def on_train_end(self, logs=None):
        self.manager.wait()


class BackupAndRestore(keras.callbacks.Callback):
    """Backs up the training state to any URL and resumes `fit` after an interruption.

    A drop-in for `keras.callbacks.BackupAndRestore` with the same arguments,
    plus `storage_options`. When `fit` starts and a backup exists, training
    resumes from it: weights, optimizer state, the epoch, and with an integer
    `save_freq` the batch within the epoch. Keras restarts an interrupted
    epoch from its first batch. This callback skips the batches that were
    already trained instead, so the resumed run repeats no step. The resumed epoch trains exactly like the lost one when
    its batch order does not depend on earlier epochs (`shuffle=False`, or a
    dataset whose order is set per epoch); Keras's `shuffle=True` draws a new
    order after a restart.

    NOTE: the metrics logged for a resumed epoch may cover only the batches
    trained after the restart. Keras builds compiled metrics at the first
    training step, which comes after the restore, so a backup's metric state
    is restored only into metrics that were already built.

    Backups are statefs checkpoints (`CheckpointManager` at `backup_dir`),
    committed by the same protocol as every other unit, so a crash during a
    backup leaves the previous one intact. After `fit` completes, the
    backups are deleted unless `delete_checkpoint=False`; a run that raises
    keeps them for the next `fit`.

    Example:

    ```python
    backup = statefs.keras.BackupAndRestore("s3://bucket/run-7/backup", save_freq=50)
    model.fit(x, y, epochs=10, callbacks=[backup])  # interrupted
    model.fit(x, y, epochs=10, callbacks=[backup])  # continues where it stopped
    ```

    Args:
        backup_dir: URL of the folder that holds the backups; use it for
            nothing else.
        save_freq: `"epoch"`, or back up every this many batches.
        double_checkpoint: keep the previous backup too, and fall back to it
            if the latest cannot be read.
        delete_checkpoint: delete the backups after `fit` completes.
        storage_options: passed to the fsspec filesystem untouched.
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
        *,
        storage_options=None,
    ):
        super().__init__()
        from statefs.checkpoints import CheckpointManager

        if not backup_dir:
            raise ValueError(f"BackupAndRestore needs a backup_dir URL. Received: backup_dir={backup_dir!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or a positive integer. Received: save_freq={save_freq!r}")
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.manager = CheckpointManager(
            backup_dir, max_to_keep=2 if double_checkpoint else 1, storage_options=storage_options
        )
        self._epoch = 0
        self._batches_since_save = 0
        self._resume = None
        self._skipper = None

    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model, so that a backup can be loaded into it before training. "
                "Build it first, for example by calling it on a batch of data."
            )
        self._resume = self._readable_backup()
        self._epoch = 0
        if self._resume is not None:
            self._epoch = self._resume.epoch or 0
            # Keras's fit reads this right after on_train_begin to pick its first epoch.
            self.model._initial_epoch = self._epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batches_since_save = 0
        if self._resume is None:
            return
        # Restored here, after fit has reset the metrics for this epoch, so a
        # mid-epoch backup brings back the epoch's metric state as well.
        checkpoint = self.manager.restore(self.model, self._resume.step)
        if checkpoint.batch:
            self._skipper = _BatchSkipper(self.model, checkpoint.batch)
        self._resume = None

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        if self._skipper is not None:
            skipped = self._skipper.skipped_last
            if not self._skipper.active():
                self._skipper = self._skipper.remove()
            if skipped:
                return
        self._batches_since_save += 1
        if self._batches_since_save >= self.save_freq:
            self._batches_since_save = 0
            self.manager.save(self.model, epoch=self._epoch, batch=batch + 1, metrics=logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._skipper is not None:
            self._skipper = self._skipper.remove()
        if self.save_freq == "epoch":
            self.manager.save(self.model, epoch=epoch + 1, batch=0, metrics=logs)

    def on_train_end(self, logs=None):
        self.model._initial_epoch = None
        self.manager.wait()
        if self.delete_checkpoint:
            for checkpoint in self.manager.list():
                self.manager.delete(checkpoint.step)
            self.manager.remove_root_if_empty()

    def _readable_backup(self):
        """Return the newest backup that can be read, trying the previous one with double_checkpoint."""
        checkpoints = self.manager.list()
        if not checkpoints:
            return None
        if not self.double_checkpoint or len(checkpoints) == 1:
            return checkpoints[-1]
        problems = self.manager.verify(checkpoints[-1].step)
        if not problems:
            return checkpoints[-1]
        logging.getLogger(__name__).warning(
            "The latest backup %s is damaged (%s); deleting it and resuming from the previous one.",
            checkpoints[-1].url, problems[0],
        )
        # The resumed run writes this step again, and a backup is only ever this callback's own.
        self.manager.delete(checkpoints[-1].step)
        return checkpoints[-2]


class _BatchSkipper:
    """Makes `fit` draw the batches that a resumed epoch already trained, without training on them.

    Keras's epoch loop calls `model.train_function(iterator)` once per step;
    while batches remain to skip, this wrapper takes one batch per step from
    the iterator and returns the restored metrics instead of training.
    """

    def __init__(self, model, batches: int):
        self.model = model
        self.remaining = batches
        self.skipped_last = False
        self.original = model.train_function
        steps_per_execution = getattr(model, "steps_per_execution", 1) or 1
        if batches % steps_per_execution:
            raise ValueError(
                f"Cannot resume at batch {batches}: it is not a multiple of steps_per_execution="
                f"{steps_per_execution}. Back up with a save_freq that is a multiple of it."
            )
        self.steps_per_execution = steps_per_execution
        model.train_function = self._skip_or_train

    def active(self) -> bool:
        return self.remaining > 0

    def remove(self):
        self.model.train_function = self.original

    def _skip_or_train(self, iterator):
        self.skipped_last = self.remaining > 0
        if not self.skipped_last:
            return self.original(iterator)
        for _ in range(self.steps_per_execution):
            next(iterator)
        self.remaining -= self.steps_per_execution
        try:
            return self.model.get_metrics_result()
        except ValueError:
            # Compiled metrics are built by the first traced training step, which has not run yet.
            return {}
