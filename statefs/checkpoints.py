"""Training checkpoints under one root URL: saved in the background if asked, rotated by policies.

A checkpoint is a unit `<root>/ckpt-<step>/` holding the training state
(`statefs.training_state`: variables, optimizer slots, position and RNG
states) and a manifest written last. Listing, `latest()` and rotation read
manifests only, so they see committed checkpoints only, and a new manager
on the same root continues where an earlier one stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

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
    verify_unit,
)
from statefs.errors import UnitExistsError
from statefs.manifest import Manifest
from statefs.retention import KeepLatest, RetentionPolicy, select_for_deletion

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)$")
# Checkpoints written by statefs 0.1 hold Keras's weights file instead of state.bin.
KERAS_WEIGHTS_FILE = "checkpoint.weights.h5"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint.

    Attributes:
        step: the optimizer's iteration count when it was saved, or the
            step passed to `save`.
        url: the checkpoint's prefix.
        epoch: epochs completed when it was saved, if known.
        batch: batches completed in the epoch under way, if known; 0 at an
            epoch's end.
        metrics: the metrics logged when it was saved.
        created: UTC commit time, ISO 8601.
        extra: the extra state passed to `save`; filled by `restore` only.
    """

    step: int
    url: str
    epoch: int | None = None
    batch: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_manifest(cls, step: int, url: str, manifest: Manifest, extra: dict[str, Any] | None = None) -> Checkpoint:
        return cls(
            step=step,
            url=url,
            epoch=manifest.metadata.get("epoch"),
            batch=manifest.metadata.get("batch"),
            metrics=manifest.metadata.get("metrics") or {},
            created=manifest.created,
            extra=extra or {},
        )


class CheckpointManager:
    """Saves, lists, rotates and restores training checkpoints at a URL.

    A checkpoint holds everything needed to continue training exactly:
    weights, optimizer iterations and slots, metric state, the epoch and the
    batch within it, the global random generators (Python, NumPy, TensorFlow
    and Keras) and a JSON-serializable dict of extra state.

    Rotation keeps a checkpoint if any retention policy keeps it
    (`max_to_keep` adds `KeepLatest(max_to_keep)`), and never deletes the
    newest one. It is rebuilt from storage after every save, so it counts the
    committed checkpoints of earlier runs under the same root too. Anything
    else under the root is reported once and never deleted.

    Example:

    ```python
    import statefs

    ckpts = statefs.CheckpointManager("memory://run-7/ckpt", max_to_keep=3)
    model.fit(x, y, epochs=5, callbacks=[ckpts.callback()])
    ckpts.latest().epoch  # 5
    ckpts.save(model, epoch=5, blocking=False)  # returns while it writes
    ckpts.wait()
    ckpts.restore(model)
    ```

    Args:
        url: root folder of the checkpoints, at any fsspec URL.
        max_to_keep: how many of the newest checkpoints to keep; None keeps all.
        keep: more retention policies, such as `KeepEvery(hours=1)` or
            `KeepBest(3, "val_loss")`.
        storage_options: passed to the fsspec filesystem untouched.
        max_in_flight: how many saves with `blocking=False` may be written
            at once; a further save waits for the oldest. Each keeps one copy
            of the model's state in memory.
    """

    def __init__(
        self,
        url: str,
        *,
        max_to_keep: int | None = 5,
        keep: Sequence[RetentionPolicy] = (),
        storage_options: dict[str, Any] | None = None,
        max_in_flight: int = 1,
    ):
        _check_positive("max_to_keep", max_to_keep, allow_none=True)
        _check_positive("max_in_flight", max_in_flight)
        self.backend, self.path = backends.resolve(url, storage_options)
        self.backend.check(self.path)
        self.url = self.backend.url(self.path)
        self.max_to_keep = max_to_keep
        self.max_in_flight = max_in_flight
        self.policies: list[RetentionPolicy] = list(keep)
        if max_to_keep is not None:
            self.policies.insert(0, KeepLatest(max_to_keep))
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future] = []
        self._last_step: int | None = None
        self._reported_foreign = False

    def __repr__(self) -> str:
        return f"CheckpointManager({self.url!r}, max_to_keep={self.max_to_keep})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # The block's own exception matters more than a failed background save, which is logged instead.
        try:
            self.close()
        except Exception as error:
            logger.error("A background save to %s failed while the block raised: %s", self.url, error)

    def list(self) -> list[Checkpoint]:
        """Return the committed checkpoints, oldest first."""
        self._raise_failed_save()
        return self._committed()

    def latest(self) -> Checkpoint | None:
        """Return the committed checkpoint with the highest step, or None if there is none.

        A save still being written in the background does not count until it commits.
        """
        self._raise_failed_save()
        for step, path in reversed(self._candidates()):
            manifest = committed_manifest_or_none(self.backend, path)
            if manifest is not None and manifest.kind == "checkpoint":
                return Checkpoint.from_manifest(step, self.backend.url(path), manifest)
        return None

    def save(
        self,
        model: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        batch: int | None = None,
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        blocking: bool = True,
    ) -> Checkpoint | concurrent.futures.Future:
        """Save the training state as a new checkpoint, then rotate old ones.

        With `blocking=False` the state is captured (TensorFlow variables
        without a copy, see `CapturedState`) and a background thread writes
        it. The call returns a Future of the Checkpoint. If that write fails,
        the next call to this manager raises its error. `wait()` or `close()`
        waits for every write.

        Under a multi-worker `tf.distribute` strategy every worker calls
        `save`, and only the chief writes. Every worker returns once the
        chief has committed, or raises if it failed. Such saves block.

        Args:
            model: a built Keras model.
            step: the checkpoint's number; defaults to the optimizer's
                iteration count, or one past the latest checkpoint for a
                model without an optimizer.
            epoch: epochs completed.
            batch: batches completed in the epoch under way (0 at an epoch's end).
            metrics: metric values to store with the checkpoint.
            extra: JSON-serializable state of your own (data position, a
                schedule), returned by `restore` as `Checkpoint.extra`.
            blocking: wait for the commit (True), or write in the background.

        Raises:
            UnitExistsError: a checkpoint with this step is already committed.
            TypeError: `extra` is not JSON-serializable.
        """
        from statefs import distribute
        from statefs.training_state import CapturedState, Position

        self._raise_failed_save()
        context = distribute.worker_context(model)
        if blocking or context is not None:
            self.wait()
        else:
            self._wait_for_slot()
        step = self._next_step(model) if step is None else _check_step(step)
        metadata = {"step": step, "epoch": epoch, "batch": batch, "metrics": _plain_metrics(metrics)}
        position = Position(step=step, epoch=epoch, batch=batch, extra=dict(extra or {}))
        if context is not None:
            return self._save_as_worker(context, model, position, metadata)
        state = CapturedState(model, position)
        self._last_step = step
        if blocking:
            return self._write(state, metadata)
        future = self._background().submit(self._write, state, metadata)
        future.add_done_callback(self._log_failure)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Wait until every background save has committed; raise the first error among them."""
        concurrent.futures.wait(self._pending)
        self._raise_failed_save()

    def close(self) -> None:
        """Wait for the background saves, then stop the thread that writes them."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def restore(
        self, model: Any, step: int | None = None, *, verify_checksums: bool = True, restore_rng: bool = True
    ) -> Checkpoint:
        """Load a checkpoint's state into `model` and return it, with its `extra` state.

        Every byte is read and checked before the first variable is assigned,
        so a damaged or mismatched checkpoint leaves the model as it was.

        Args:
            model: a model with the architecture that was saved; its
                optimizer, if any, is built before loading.
            step: which checkpoint; the latest by default.
            verify_checksums: check CRC32C values while reading; sizes are
                checked either way.
            restore_rng: also set the global random generators to their
                saved states.

        Raises:
            FileNotFoundError: there is no committed checkpoint (at that step).
            IntegrityError: a stored file differs from the manifest.
            ValueError: the checkpoint's variables do not fit the model.
        """
        from statefs import training_state

        self.wait()
        if step is None:
            checkpoint = self.latest()
            if checkpoint is None:
                raise FileNotFoundError(f"No committed checkpoint under {self.url} to restore.")
            step = checkpoint.step
        path = self.backend.join(self.path, f"ckpt-{_check_step(step)}")
        manifest = require_manifest(self.backend, path, "checkpoint")
        if KERAS_WEIGHTS_FILE in manifest.files:
            self._restore_keras_weights(model, path, manifest, verify_checksums)
            return Checkpoint.from_manifest(step, self.backend.url(path), manifest)
        loaded = training_state.read_state(self.backend, path, manifest, verify_checksums=verify_checksums)
        loaded.assign(model, restore_rng=restore_rng)
        logger.info("Restored checkpoint %s", self.backend.url(path))
        return Checkpoint.from_manifest(step, self.backend.url(path), manifest, extra=loaded.position.extra)

    def delete(self, step: int) -> None:
        """Delete the committed checkpoint at `step`: its manifest first, so it stops counting at once."""
        self.wait()
        path = self.backend.join(self.path, f"ckpt-{_check_step(step)}")
        require_manifest(self.backend, path, "checkpoint")
        delete_unit(self.backend, path)

    def verify(self, step: int) -> list[OSError]:
        """Return the problems found when the checkpoint's stored files are checked against its manifest."""
        path = self.backend.join(self.path, f"ckpt-{_check_step(step)}")
        return verify_unit(self.backend, path, require_manifest(self.backend, path, "checkpoint"))

    def remove_root_if_empty(self) -> None:
        """Remove the root folder if nothing is left in it (object stores have no empty folders)."""
        if self.backend.exists(self.path) and not self.backend.list_dir(self.path):
            self.backend.delete_tree(self.path)

    def callback(self, *, blocking: bool = True) -> Any:
        """Return a Keras callback that saves a checkpoint at the end of every epoch."""
        from statefs.keras import CheckpointCallback

        return CheckpointCallback(self, blocking=blocking)

    def _write(self, state: Any, metadata: dict[str, Any]) -> Checkpoint:
        step = metadata["step"]
        path = self.backend.join(self.path, f"ckpt-{step}")
        # One manager writes a root at a time, so a claim without a manifest
        # at this step is a save that died. Removing it lets this save heal it.
        remove_fragment(self.backend, path)
        writer = UnitWriter(self.backend, path, kind="checkpoint", metadata=metadata)
        try:
            with writer.claimed():
                state.write(writer)
                manifest = writer.commit()
        except UnitExistsError as error:
            # Only the claim raises this: the step is taken.
            raise UnitExistsError(f"{error} Pass save(step=...) to number this checkpoint differently.") from None
        self._rotate(step)
        return Checkpoint.from_manifest(step, writer.url, manifest)

    def _save_as_worker(self, context: Any, model: Any, position: Any, metadata: dict[str, Any]) -> Checkpoint:
        """Save under a multi-worker strategy: the chief writes, every worker agrees on the outcome."""
        from statefs.training_state import CapturedState

        step = position.step
        try:
            # Every worker captures: reading Keras metric variables, which sync
            # on read, is itself an all-reduce that each worker must join.
            state = CapturedState(model, position)
            checkpoint = self._write(state, metadata) if context.is_chief else None
        except BaseException as error:
            _agree_after_failure(context, error)
            raise
        del state
        if not context.agree(True):
            if context.is_chief:
                raise RuntimeError(f"A worker failed while the chief saved checkpoint {step} to {self.url}.")
            raise RuntimeError(
                f"The chief worker failed to save checkpoint {step} to {self.url}; its log contains the reason. "
                f"This worker ({context.task}) wrote nothing."
            )
        if checkpoint is not None:
            return checkpoint
        path = self.backend.join(self.path, f"ckpt-{step}")
        return Checkpoint.from_manifest(step, self.backend.url(path), require_manifest(self.backend, path, "checkpoint"))

    def _restore_keras_weights(self, model: Any, path: str, manifest: Manifest, verify_checksums: bool) -> None:
        from statefs import keras_io

        with staging_folder("restore") as staging:
            download_unit(self.backend, path, manifest, staging, verify_checksums=verify_checksums)
            keras_io.load_weights(model, os.path.join(staging, KERAS_WEIGHTS_FILE))
        logger.info("Restored checkpoint %s (Keras weights file: no position or RNG state)", self.backend.url(path))

    def _background(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="statefs-save")
        return self._executor

    def _wait_for_slot(self) -> None:
        while len([future for future in self._pending if not future.done()]) >= self.max_in_flight:
            concurrent.futures.wait(self._pending, return_when=concurrent.futures.FIRST_COMPLETED)
        self._raise_failed_save()

    def _log_failure(self, future: concurrent.futures.Future) -> None:
        # Logged when it happens too, because a program that never calls the manager again would not see it.
        if not future.cancelled() and future.exception() is not None:
            logger.error("A background save to %s failed: %s", self.url, future.exception())

    def _raise_failed_save(self) -> None:
        """Forget the finished background saves; raise the error of the first that failed."""
        done = [future for future in self._pending if future.done()]
        self._pending = [future for future in self._pending if not future.done()]
        errors = [future.exception() for future in done if future.exception() is not None]
        if errors:
            errors[0].add_note(f"Raised by a background save to {self.url}; the checkpoint was not committed.")
            raise errors[0]

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
        if self._last_step is not None:
            return self._last_step + 1
        latest = self.latest()
        return 0 if latest is None else latest.step + 1

    def _rotate(self, saved_step: int) -> None:
        checkpoints = self._committed()
        for checkpoint in select_for_deletion(checkpoints, self.policies):
            if checkpoint.step == saved_step:
                logger.warning(
                    "Checkpoint %d was deleted right after its save: no retention policy keeps it among the %d "
                    "checkpoints under %s, which include higher steps from an earlier run (up to %d). Use a new "
                    "root for a new run.",
                    saved_step, len(checkpoints), self.url, checkpoints[-1].step,
                )
            delete_unit(self.backend, self.backend.join(self.path, f"ckpt-{checkpoint.step}"))
        self._report_foreign_entries()

    def _committed(self) -> list[Checkpoint]:
        checkpoints = []
        for step, path in self._candidates():
            manifest = committed_manifest_or_none(self.backend, path)
            if manifest is not None and manifest.kind == "checkpoint":
                checkpoints.append(Checkpoint.from_manifest(step, self.backend.url(path), manifest))
        return checkpoints

    def _report_foreign_entries(self) -> None:
        """Warn once about entries under the root that are not checkpoints; rotation leaves them alone."""
        if self._reported_foreign:
            return
        self._reported_foreign = True
        foreign = []
        for info in self.backend.list_dir(self.path):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if not CHECKPOINT_NAME.match(name):
                foreign.append(name)
        if foreign:
            logger.warning(
                "%s contains %d entries that are not statefs checkpoints (%s). Rotation neither counts nor deletes them.",
                self.url, len(foreign), ", ".join(sorted(foreign)[:5]),
            )


def _agree_after_failure(context: Any, error: BaseException) -> None:
    """Tell the other workers that this save failed, keeping `error` as the one raised."""
    try:
        context.agree(False)
    except Exception as barrier_error:
        # A worker that died makes the barrier fail too, and that error would hide the first one.
        logger.error("Failed to report the failed save (%s) to the other workers: %s", error, barrier_error)


def _check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {expected}. Received: {name}={value!r}")


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"A checkpoint step must be a non-negative integer. Received: step={step!r}")
    return step


def _plain_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Turn logged metric values (NumPy or tensor scalars) into floats."""
    return {name: float(value) for name, value in (metrics or {}).items()}
