"""Training checkpoints under one root URL, kept to `max_to_keep`."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Sequence

from statefs import backends
from statefs.commit import (
    UnitWriter,
    committed_manifest_or_none,
    delete_unit,
    download_unit,
    list_children,
    remove_fragment,
    require_manifest,
    staging_folder,
)
from statefs.manifest import Manifest
from statefs.retention import KeepLatest, RetentionPolicy, steps_to_delete

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint.

    Attributes:
        step: the optimizer's iteration count when it was saved, or the
            step passed to `save`.
        url: the checkpoint's prefix.
        epoch: epochs completed, if known.
        metrics: the metrics logged when it was saved.
        created: UTC commit time, ISO 8601.
    """

    step: int
    url: str
    epoch: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    created: str = ""

    @classmethod
    def from_manifest(cls, step: int, url: str, manifest: Manifest) -> Checkpoint:
        return cls(
            step=step,
            url=url,
            epoch=manifest.metadata.get("epoch"),
            metrics=manifest.metadata.get("metrics") or {},
            created=manifest.created,
        )


class CheckpointManager:
    """Saves, lists, rotates and restores training checkpoints at a URL.

    Each checkpoint is a unit `<url>/ckpt-<step>/` holding the model's
    weights and optimizer state (`checkpoint.weights.h5`) and a manifest
    written last, so `latest()` and rotation see committed checkpoints only.
    Rotation is rebuilt from storage, so a new manager on the same root
    continues where an earlier one stopped.

    Example:

    ```python
    import statefs

    ckpts = statefs.CheckpointManager("memory://run-7/ckpt", max_to_keep=3)
    model.fit(x, y, epochs=5, callbacks=[ckpts.callback()])
    ckpts.latest().epoch  # 5
    ckpts.restore(model)
    ```

    Args:
        url: root folder of the checkpoints, at any fsspec URL.
        max_to_keep: how many of the newest checkpoints to keep; None keeps all.
        keep: more retention policies; a checkpoint stays if any policy keeps it.
        storage_options: passed to the fsspec filesystem untouched.
    """

    def __init__(
        self,
        url: str,
        *,
        max_to_keep: int | None = 5,
        keep: Sequence[RetentionPolicy] = (),
        storage_options: dict[str, Any] | None = None,
    ):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive integer or None. Received: max_to_keep={max_to_keep!r}")
        self.backend, self.path = backends.resolve(url, storage_options)
        self.backend.check(self.path)
        self.url = self.backend.url(self.path)
        self.max_to_keep = max_to_keep
        self.policies: list[RetentionPolicy] = list(keep)
        if max_to_keep is not None:
            self.policies.insert(0, KeepLatest(max_to_keep))

    def __repr__(self) -> str:
        return f"CheckpointManager({self.url!r}, max_to_keep={self.max_to_keep})"

    def list(self) -> list[Checkpoint]:
        """Return the committed checkpoints, oldest first."""
        checkpoints = []
        for step, path in self._candidates():
            manifest = committed_manifest_or_none(self.backend, path)
            if manifest is not None and manifest.kind == "checkpoint":
                checkpoints.append(Checkpoint.from_manifest(step, self.backend.url(path), manifest))
        return checkpoints

    def latest(self) -> Checkpoint | None:
        """Return the committed checkpoint with the highest step, or None if there is none."""
        for step, path in reversed(self._candidates()):
            manifest = committed_manifest_or_none(self.backend, path)
            if manifest is not None and manifest.kind == "checkpoint":
                return Checkpoint.from_manifest(step, self.backend.url(path), manifest)
        return None

    def save(self, model: Any, *, step: int | None = None, epoch: int | None = None, metrics: dict[str, Any] | None = None) -> Checkpoint:
        """Save weights and optimizer state as a new checkpoint, then rotate old ones.

        Args:
            model: a built Keras model.
            step: the checkpoint's number; defaults to the optimizer's
                iteration count, or one past the latest checkpoint for a
                model without an optimizer.
            epoch: epochs completed, stored for `restore` and listings.
            metrics: metric values to store with the checkpoint.

        Raises:
            UnitExistsError: a checkpoint with this step is already committed.
        """
        from statefs import keras_io

        step = self._next_step(model) if step is None else _check_step(step)
        path = self.backend.join(self.path, f"ckpt-{step}")
        # One manager writes a root at a time, so a claim without a manifest
        # at this step is a save that died. Removing it lets this save heal it.
        remove_fragment(self.backend, path)
        metadata = {"step": step, "epoch": epoch, "metrics": _plain_metrics(metrics)}
        writer = UnitWriter(self.backend, path, kind="checkpoint", metadata=metadata)
        # TODO(#4): a local save costs about 1.5x Keras save_weights (40M
        # parameters, benchmarks/bench_save_load.py): the staging copy and
        # the fsync come on top of the h5 write.
        with staging_folder("checkpoint") as staging:
            local_file = os.path.join(staging, keras_io.CHECKPOINT_FILE)
            model.save_weights(local_file)
            with writer.claimed():
                writer.put_file(local_file, keras_io.CHECKPOINT_FILE)
                manifest = writer.commit()
        self._rotate()
        return Checkpoint.from_manifest(step, writer.url, manifest)

    def restore(self, model: Any, step: int | None = None, *, verify_checksums: bool = True) -> Checkpoint:
        """Load weights and optimizer state of a checkpoint into `model`.

        Args:
            model: a model with the architecture that was saved; its
                optimizer, if any, is built before loading.
            step: which checkpoint; the latest by default.
            verify_checksums: check CRC32C values while downloading; sizes
                are checked either way.

        Raises:
            FileNotFoundError: there is no committed checkpoint (at that step).
            IntegrityError: a downloaded file differs from the manifest.
        """
        from statefs import keras_io

        if step is None:
            checkpoint = self.latest()
            if checkpoint is None:
                raise FileNotFoundError(f"No committed checkpoint under {self.url} to restore.")
            step = checkpoint.step
        path = self.backend.join(self.path, f"ckpt-{_check_step(step)}")
        manifest = require_manifest(self.backend, path, "checkpoint")
        # TODO(#4): a local restore costs about 2.2x Keras load_weights (40M
        # parameters) because the file is copied to staging before loading.
        with staging_folder("restore") as staging:
            download_unit(self.backend, path, manifest, staging, verify_checksums=verify_checksums)
            keras_io.load_weights(model, os.path.join(staging, keras_io.CHECKPOINT_FILE))
        logger.info("Restored checkpoint %s", self.backend.url(path))
        return Checkpoint.from_manifest(step, self.backend.url(path), manifest)

    def callback(self) -> Any:
        """Return a Keras callback that saves a checkpoint at the end of every epoch."""
        from statefs.keras import CheckpointCallback

        return CheckpointCallback(self)

    def _candidates(self) -> list[tuple[int, str]]:
        """Return (step, path) of every folder named like a checkpoint, by step."""
        found = []
        for name, path in list_children(self.backend, self.path).items():
            match = CHECKPOINT_NAME.match(name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _next_step(self, model: Any) -> int:
        from statefs import keras_io

        step = keras_io.training_step(model)
        if step is not None:
            return step
        latest = self.latest()
        return 0 if latest is None else latest.step + 1

    def _rotate(self) -> None:
        checkpoints = self.list()
        for step in steps_to_delete(checkpoints, self.policies):
            delete_unit(self.backend, self.backend.join(self.path, f"ckpt-{step}"))


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"A checkpoint step must be a non-negative integer. Received: step={step!r}")
    return step


def _plain_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Turn logged metric values (NumPy or tensor scalars) into floats."""
    return {name: float(value) for name, value in (metrics or {}).items()}
