"""The original StateManagement class, now backed by statefs and accepting URLs."""

from __future__ import annotations

from typing import Any

from statefs.checkpoints import CheckpointManager
from statefs.migration import MigrationReport, migrate
from statefs.snapshots import Snapshot, save_snapshot
from statefs.versions import VersionRegistry

SNAPSHOT_FILE_NAME = "my_model.h5"


class StateManagement:
    """Checkpointing, version control, snapshots and migration for one Keras model.

    The four methods keep the names and arguments of statefs's first design;
    each accepts a local path or any fsspec URL, and `storage_options` for it.
    New code can use CheckpointManager, VersionRegistry, save_snapshot and
    migrate directly.

    Example:

    ```python
    state = statefs.StateManagement(model)
    state.model_checkpointing("s3://bucket/run/ckpt", x=x_train, y=y_train, epochs=3)
    state.model_version_control("s3://bucket/models", "1")
    state.model_snapshot("s3://bucket/snapshots")
    state.model_migration("s3://bucket/snapshots/my_model.h5", "/tmp/exported")
    ```

    Args:
        model: the Keras model to manage.
        storage_options: default fsspec options for every URL; each method
            also takes its own.
    """

    def __init__(self, model: Any, *, storage_options: dict[str, Any] | None = None):
        self.model = model
        self.storage_options = storage_options

    def model_checkpointing(
        self,
        checkpoint_dir: str,
        max_to_keep: int = 5,
        *,
        x: Any,
        y: Any = None,
        epochs: int = 10,
        validation_data: Any = None,
        storage_options: dict[str, Any] | None = None,
        **fit_kwargs: Any,
    ) -> Any:
        """Train on the data given, saving a checkpoint after every epoch, and return the History.

        The training data is an argument: the model is fitted on `x` and `y`
        (and `validation_data`), with `fit_kwargs` passed to `model.fit`.
        The newest `max_to_keep` checkpoints stay under `checkpoint_dir`;
        `CheckpointManager(checkpoint_dir).restore(model)` resumes from the
        latest. To add the callback to a `fit` of your own instead, use
        `CheckpointManager(checkpoint_dir, max_to_keep=...).callback()`.
        """
        manager = CheckpointManager(checkpoint_dir, max_to_keep=max_to_keep, storage_options=self._options(storage_options))
        callbacks = [*fit_kwargs.pop("callbacks", []), manager.callback()]
        return self.model.fit(x, y, epochs=epochs, validation_data=validation_data, callbacks=callbacks, **fit_kwargs)

    def model_version_control(self, model_dir: str, model_version: int | str, *, storage_options: dict[str, Any] | None = None) -> int:
        """Publish the model as version `model_version` under `model_dir` and return the number.

        The version is a SavedModel in the TF Serving layout with `model.keras`
        beside it. Publishing a number that exists raises UnitExistsError.
        """
        registry = VersionRegistry(model_dir, storage_options=self._options(storage_options))
        return registry.publish(self.model, version=model_version)

    def model_snapshot(self, snapshot_dir: str, *, storage_options: dict[str, Any] | None = None) -> Snapshot:
        """Save the whole model as `my_model.h5` in the folder `snapshot_dir`."""
        url = f"{snapshot_dir.rstrip('/')}/{SNAPSHOT_FILE_NAME}"
        return save_snapshot(self.model, url, storage_options=self._options(storage_options))

    def model_migration(
        self,
        old_model_path: str,
        new_model_path: str,
        *,
        src_storage_options: dict[str, Any] | None = None,
        dst_storage_options: dict[str, Any] | None = None,
    ) -> MigrationReport:
        """Copy a snapshot, version or root from `old_model_path` to `new_model_path`.

        A destination folder keeps the file name; a different suffix
        converts the format. See `statefs.migrate`.
        """
        return migrate(
            old_model_path,
            new_model_path,
            src_storage_options=self._options(src_storage_options),
            dst_storage_options=self._options(dst_storage_options),
        )

    def _options(self, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
        return self.storage_options if storage_options is None else storage_options
