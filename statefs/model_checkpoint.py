"""ModelCheckpoint: Keras's checkpoint callback, saving to any fsspec URL.

Every file is a statefs snapshot (`statefs.save_snapshot`): the model file
plus a sidecar manifest `<file>.statefs-manifest.json` with its size, CRC32C
and the callback's record of the save (epoch, batch, step and the logged
metrics). Retention and the best value of `monitor` are rebuilt from those
sidecars, so both survive a restart of the training job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import string
from collections.abc import Sequence
from typing import Any

import keras

from statefs import backends, keras_io
from statefs.errors import ManifestError
from statefs.retention import KeepLatest, resolve_mode, select_for_deletion
from statefs.snapshots import SIDECAR_SUFFIX, read_sidecar_manifest, save_snapshot

logger = logging.getLogger(__name__)

# The value of `writer` in the metadata of every sidecar this callback writes.
# Retention deletes only files that carry it.
WRITER = "statefs.keras.ModelCheckpoint"

# Sample values for a trial format at construction: Keras fills `epoch` and
# `batch` with ints and, since Keras 3 turns logs into Python floats, the
# metrics with floats.
_SAMPLE_INT = 1
_SAMPLE_FLOAT = 0.5


@dataclasses.dataclass(frozen=True)
class SavedCheckpoint:
    """A file that a ModelCheckpoint saved, as its sidecar records it.

    Attributes:
        url: the file's URL.
        path: the file's path inside its filesystem.
        step: the optimizer's iteration count at the save.
        created: UTC time the sidecar was written, ISO 8601.
        metrics: the logs Keras passed to the callback at the save.
        epoch: the 1-based epoch filled into the file name.
        batch: the 1-based batch of the epoch filled into the file name, or
            None for a save at the end of an epoch.
    """

    url: str
    path: str
    step: int
    created: str
    metrics: dict[str, Any]
    epoch: int | None = None
    batch: int | None = None


class FilepathTemplate:
    """A checkpoint URL whose file name may contain `str.format` fields.

    Fields are plain names (`{epoch:02d}`, `{val_loss:.2f}`). They may appear
    only in the file name, so that every file of one callback lands in one
    folder and retention can list them.
    """

    def __init__(self, filepath: str):
        self.filepath = filepath
        self.fields = _parse_fields(filepath)
        split = _last_folder_separator(filepath)
        folder = filepath[: split + 1]
        if any(field_name is not None for _, field_name, _, _ in string.Formatter().parse(folder)):
            raise ValueError(
                f"Invalid filepath {filepath!r}: format fields may appear only in the file name, "
                "not in folder names, so that all checkpoints of one callback share a folder. "
                f"Received: filepath={filepath!r}"
            )
        # The folder has no fields, so formatting only turns "{{" into "{".
        self.folder_url = folder.format()
        self.name = filepath[split + 1 :]
        self.pattern = _name_pattern(self.name)

    def format(self, values: dict[str, Any]) -> str:
        """Return the URL of the file for `values`."""
        name = self.name.format(**values)
        if "/" in name:
            raise ValueError(
                f"The file name {name!r} formatted from {self.filepath!r} contains '/'. "
                f"Change the format fields so that they do not produce '/'. Received: filepath={self.filepath!r}"
            )
        return self.folder_url + name

    def matches(self, name: str) -> bool:
        return self.pattern.fullmatch(name) is not None


class ModelCheckpoint(keras.callbacks.Callback):
    """Save the model or its weights during `fit()` to any fsspec URL.

    A drop-in for `keras.callbacks.ModelCheckpoint` with the same arguments
    and meaning, plus retention (`max_to_keep`, `keep`) and `storage_options`.
    Each file is written with `statefs.save_snapshot`, so `statefs.load_snapshot`
    loads it and `statefs verify` checks it.

    Example:

    ```python
    checkpoint = statefs.keras.ModelCheckpoint(
        "s3://bucket/run-7/ckpt-{epoch:02d}-{val_loss:.3f}.keras",
        monitor="val_loss",
        save_best_only=True,
        max_to_keep=3,
    )
    model.fit(x, y, validation_split=0.2, epochs=10, callbacks=[checkpoint])
    ```

    Configuration is checked before training starts. The constructor checks
    the template syntax, the suffix, `save_freq` and `mode`, and rejects a
    `val_` metric with an integer `save_freq`. Validation metrics exist only
    at the end of an epoch, so such a callback could never save.
    `on_train_begin` checks each template field and `monitor` against the
    names the model logs. When those names cannot be derived before
    training (a custom `train_step`, or a model without known outputs), the
    first save checks them instead.

    Retention considers only the files in the checkpoint folder whose names
    match the template and whose sidecar names this class as the writer. It
    lists the folder after every save, so a restarted job continues the
    rotation of the earlier one. Other files in the folder are reported in
    one warning and never deleted.

    Args:
        filepath: URL of the file to write. The file name may contain
            `str.format` fields: `epoch` (1-based), `batch` (1-based, only
            with an integer `save_freq`) and any name in the logs, such as
            `{epoch:02d}-{val_loss:.2f}.keras`. It must end in `.weights.h5`
            when `save_weights_only` is True, and in `.keras` (or the legacy
            `.h5`) otherwise.
        monitor: the logged metric that `save_best_only` compares, such as
            `"val_loss"` or `"accuracy"`.
        verbose: 0 is silent, and 1 prints a line for every save and for
            every epoch without improvement.
        save_best_only: save only when `monitor` improved on the best value
            so far, which includes the files that earlier runs of this
            callback left in the folder.
        save_weights_only: save `model.save_weights` files (with the
            optimizer state) instead of whole models.
        mode: `"min"`, `"max"` or `"auto"`, which infers the direction from
            the name of `monitor` (`statefs.retention.resolve_mode`).
        save_freq: `"epoch"`, or a positive number of batches between saves.
        initial_value_threshold: the value `monitor` must beat before the
            first save when `save_best_only` is True.
        max_to_keep: how many of the newest files to keep, or None to keep all.
        keep: further retention policies from `statefs.retention`, such as
            `KeepBest(2, "val_loss")`. A file is deleted only when neither
            `max_to_keep` nor any of these keeps it.
        storage_options: passed to the fsspec filesystem untouched.

    Raises:
        ValueError: an invalid argument or combination, with the value received.
        TypeError: `keep` contains an object without a `keep` method.
    """

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        max_to_keep: int | None = None,
        keep: Sequence[Any] = (),
        storage_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        filepath = _filepath_string(filepath)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = _check_save_freq(save_freq)
        self.mode = resolve_mode(monitor, mode)
        self.initial_value_threshold = _check_threshold(initial_value_threshold)
        self.max_to_keep = _check_max_to_keep(max_to_keep)
        self.keep = _check_policies(keep)
        self.storage_options = storage_options

        self.template = FilepathTemplate(filepath)
        self.filepath = filepath
        _check_suffix(filepath, save_weights_only)
        self._check_fields_against_save_freq()
        self._check_trial_format()
        _check_monitors_against_save_freq(self._monitors(), self.save_freq)

        self._backend, self._folder = backends.resolve(self.template.folder_url or ".", storage_options)
        self.best = self.initial_value_threshold
        self._sidecars: dict[str, SavedCheckpoint | None] = {}
        self._foreign_reported = False
        self._log_names: set[str] | None = None
        self._epoch = 0
        self._batches_since_save = 0
        self._last_batch: int | None = None
        self._validation_seen = False

    # Checks at construction.

    def _check_fields_against_save_freq(self) -> None:
        for field in self.template.fields:
            if field == "batch" and self.save_freq == "epoch":
                raise ValueError(
                    f"The filepath field {{batch}} needs an integer `save_freq`: with save_freq='epoch' "
                    "every save happens at the end of an epoch, where there is no batch. Use {epoch} "
                    f"instead, or pass save_freq=<number of batches>. Received: filepath={self.filepath!r}"
                )
            if field.startswith("val_") and self.save_freq != "epoch":
                raise ValueError(
                    f"The filepath field {{{field}}} is a validation metric, which exists only at the end "
                    f"of an epoch, but save_freq={self.save_freq!r} saves after a number of batches. Use "
                    "save_freq='epoch', or a training metric in the file name. "
                    f"Received: filepath={self.filepath!r}, save_freq={self.save_freq!r}"
                )

    def _check_trial_format(self) -> None:
        """Format the file name once with sample values, so a bad format spec fails here."""
        values = {field: _SAMPLE_FLOAT for field in self.template.fields}
        values.update(epoch=_SAMPLE_INT, batch=_SAMPLE_INT)
        try:
            url = self.template.format(values)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"Invalid filepath {self.filepath!r}: formatting it failed ({error}). Format `epoch` and "
                "`batch` as integers (e.g. {epoch:02d}) and metrics as floats (e.g. {val_loss:.2f}). "
                f"Received: filepath={self.filepath!r}"
            ) from None
        keras_io.snapshot_format(url)

    def _monitors(self) -> dict[str, str]:
        """Return the metrics that decide which files exist, each with what it is for."""
        monitors = {}
        if self.save_best_only:
            monitors[self.monitor] = "monitor"
        for policy in self.keep:
            name = getattr(policy, "monitor", None)
            if isinstance(name, str):
                monitors.setdefault(name, f"the monitor of {policy!r}")
        return monitors

    # Keras hooks.

    def on_train_begin(self, logs=None):
        self._backend.check(self._folder)
        self._log_names = training_log_names(self.model)
        if self._log_names is None:
            logger.debug("Cannot derive the logged names of %r before training, so the first save checks them", self.model)
        else:
            self._check_names_against_logs()
        self._epoch = 0
        self._batches_since_save = 0
        self._last_batch = None
        self._validation_seen = False
        if self.save_best_only:
            self._restore_best()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._batch_save_due(batch):
            self._save(self._epoch, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    # Checks before the first batch.

    def _check_names_against_logs(self) -> None:
        known = self._known_names()
        for field in self.template.fields:
            if field not in known:
                raise ValueError(
                    f"Unknown field {{{field}}} in the filepath: this model logs no metric named {field!r}. "
                    f"Known names: {', '.join(sorted(known))}. Received: filepath={self.filepath!r}"
                )
        for name, role in self._monitors().items():
            if name not in known:
                raise ValueError(
                    f"Unknown metric {name!r} used as {role}: this model logs no metric of that name. "
                    f"Known names: {', '.join(sorted(known - {'epoch', 'batch'}))}. Received: monitor={name!r}"
                )

    def _known_names(self) -> set[str]:
        known = set(self._log_names or ())
        if self.save_freq == "epoch":
            known |= {"val_" + name for name in known} | {"epoch"}
        else:
            known |= {"epoch", "batch"}
        return known

    def _missing_names(self, logs: dict[str, Any]) -> list[str]:
        needed = [field for field in self.template.fields if field not in ("epoch", "batch")]
        needed += list(self._monitors())
        return [name for name in dict.fromkeys(needed) if name not in logs]

    def _require_logged(self, epoch: int, logs: dict[str, Any]) -> bool:
        """Return True if the logs contain every name the save needs, False to skip this save.

        Raises:
            ValueError: a needed name is missing and later logs will not contain it either.
        """
        validation_ran = any(name.startswith("val_") for name in logs)
        self._validation_seen |= validation_ran
        missing = self._missing_names(logs)
        if not missing:
            return True
        if all(name.startswith("val_") for name in missing) and not validation_ran:
            if self._validation_seen:
                # fit(validation_freq=N) validates only every Nth epoch.
                logger.info("Epoch %d has no validation metrics, so %s saves nothing", epoch + 1, self.filepath)
                return False
            # NOTE: validation_freq=N with N > 1 also raises here, because
            # Keras does not pass validation_freq to callbacks.
            raise ValueError(
                f"Epoch {epoch + 1} ended without validation metrics, but {', '.join(missing)} must be "
                "logged to save a checkpoint. Pass validation_data or validation_split to fit() (with "
                "validation_freq, validate in the first epoch too), or use a training metric. "
                f"Received: filepath={self.filepath!r}, monitor={self.monitor!r}, logs={sorted(logs)}"
            )
        raise ValueError(
            f"Cannot save a checkpoint at epoch {epoch + 1}: the logs have no {', '.join(missing)}. "
            f"Logged names: {', '.join(sorted(logs))}. Received: filepath={self.filepath!r}"
        )

    # Saving.

    def _batch_save_due(self, batch: int) -> bool:
        if self.save_freq == "epoch":
            return False
        # With steps_per_execution > 1, Keras calls this only every few
        # batches, so count the batches run since the last call.
        if self._last_batch is None or batch <= self._last_batch:
            self._batches_since_save += batch + 1
        else:
            self._batches_since_save += batch - self._last_batch
        self._last_batch = batch
        if self._batches_since_save < self.save_freq:
            return False
        self._batches_since_save = 0
        return True

    def _save(self, epoch: int, batch: int | None, logs: dict[str, Any] | None) -> None:
        logs = dict(logs or {})
        if not self._require_logged(epoch, logs):
            return
        values = {**logs, "epoch": epoch + 1}
        if batch is not None:
            values["batch"] = batch + 1
        url = self.template.format(values)
        if self.save_best_only and not self._improved(epoch, logs[self.monitor], url):
            return
        if self.verbose > 0 and not self.save_best_only:
            print(f"\nEpoch {epoch + 1}: saving the model to {url}")

        step = keras_io.training_step(self.model) or 0
        metadata = {
            "writer": WRITER,
            "template": self.template.name,
            "epoch": epoch + 1,
            "batch": None if batch is None else batch + 1,
            "step": step,
            "metrics": logs,
        }
        snapshot = save_snapshot(self.model, url, storage_options=self.storage_options, metadata=metadata)
        self._sidecars.pop(_base_name(snapshot.url), None)
        if self.save_best_only:
            self.best = logs[self.monitor]
        self._apply_retention(_base_name(snapshot.url))

    def _improved(self, epoch: int, current: Any, url: str) -> bool:
        previous = "none" if self.best is None else f"{self.best:.5f}"
        if not self._is_better(current, self.best):
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve on {previous}")
            return False
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {previous} to {current:.5f}; saving the model to {url}")
        return True

    def _is_better(self, value: Any, reference: Any) -> bool:
        if value is None or _is_nan(value):
            return False
        if reference is None:
            return True
        return value < reference if self.mode == "min" else value > reference

    def _restore_best(self) -> None:
        """Continue from the best `monitor` value in this callback's existing files."""
        stored = None
        records = self._list_saved()
        for record in records:
            value = record.metrics.get(self.monitor)
            if isinstance(value, numbers.Real) and self._is_better(value, stored):
                stored = value
        if self._is_better(stored, self.best):
            logger.info("Best %s so far is %s, from %d files under %s", self.monitor, stored, len(records), self._folder_url())
            self.best = stored

    # Retention.

    def _policies(self) -> list[Any]:
        policies = list(self.keep)
        if self.max_to_keep is not None:
            policies.append(KeepLatest(self.max_to_keep))
        return policies

    def _apply_retention(self, saved_name: str) -> None:
        policies = self._policies()
        if not policies:
            return
        for record in select_for_deletion(self._list_saved(), policies):
            if _base_name(record.path) != saved_name:
                self._delete(record)

    def _delete(self, record: SavedCheckpoint) -> None:
        # The sidecar goes first: a file left without one is never deleted
        # by retention again, while a sidecar without its file would fail `verify`.
        try:
            self._backend.delete(record.path + SIDECAR_SUFFIX)
            self._backend.delete(record.path)
        except OSError as error:
            logger.warning("Cannot delete old checkpoint %s: %s", record.url, error)
            return
        self._sidecars.pop(_base_name(record.path), None)
        logger.info("Deleted old checkpoint %s", record.url)

    def _list_saved(self) -> list[SavedCheckpoint]:
        """Return this callback's files in its folder, oldest first, and report any other file once."""
        entries = {_base_name(entry["name"]): entry for entry in self._backend.list_dir(self._folder)}
        records = []
        foreign = []
        for name, entry in sorted(entries.items()):
            if name.endswith(SIDECAR_SUFFIX) and name[: -len(SIDECAR_SUFFIX)] in entries:
                continue
            record = None
            if entry.get("type") != "directory" and self.template.matches(name) and name + SIDECAR_SUFFIX in entries:
                record = self._read_record(name, entry["name"])
            if record is None:
                foreign.append(name)
            else:
                records.append(record)
        self._report_foreign(foreign)
        records.sort(key=lambda record: (record.created, record.step, record.epoch or 0, record.batch or 0))
        return records

    def _read_record(self, name: str, path: str) -> SavedCheckpoint | None:
        """Return the record in a file's sidecar, or None if this class did not write it."""
        if name not in self._sidecars:
            try:
                manifest = read_sidecar_manifest(self._backend, path)
            except ManifestError as error:
                logger.debug("Ignoring %s: %s", self._backend.url(path), error)
                manifest = None
            self._sidecars[name] = None if manifest is None else _record_from_manifest(self._backend, path, manifest)
        return self._sidecars[name]

    def _report_foreign(self, foreign: list[str]) -> None:
        if not foreign or self._foreign_reported:
            return
        self._foreign_reported = True
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        logger.warning(
            "%d entries under %s were not written by this ModelCheckpoint (%s). Retention leaves them alone. "
            "Give each callback a folder of its own to keep them apart.",
            len(foreign),
            self._folder_url(),
            shown,
        )

    def _folder_url(self) -> str:
        return self._backend.url(self._folder)


# Names that fit() logs.


def training_log_names(model: Any) -> set[str] | None:
    """Return the names `model.fit()` will log for training, or None when they cannot be known yet.

    The names come from the model's metrics once they are built. Before the
    first training step Keras (3.15, TensorFlow backend) has not built the
    compiled metrics, so they are derived from the compile arguments. A
    custom `train_step` may log anything, so its names are unknown.
    """
    if _has_custom_train_step(model):
        return None
    try:
        if _compiled_state_built(model):
            return set(model.get_metrics_result())
        return _predicted_log_names(model)
    except Exception as error:  # noqa: BLE001 - the prediction reads Keras internals that may change
        logger.debug("Cannot derive the logged names of %r: %s", model, error)
        return None


def _compiled_state_built(model: Any) -> bool:
    """Return True once the compiled loss and metrics are built, so `model.metrics` lists every log name."""
    compiled = (getattr(model, "_compile_loss", None), getattr(model, "_compile_metrics", None))
    return all(part is None or part.built for part in compiled)


def _has_custom_train_step(model: Any) -> bool:
    for cls in type(model).__mro__:
        if "train_step" in vars(cls):
            return not cls.__module__.startswith("keras.")
    return False


def _predicted_log_names(model: Any) -> set[str]:
    """Return the training log names, building copies of the compiled loss and metrics on symbolic outputs.

    The copies let Keras name the metrics (output prefixes, duplicates)
    without building the model's own objects on guessed targets. The names do
    not depend on the target shapes, so the outputs stand in for them.
    """
    from keras.src.trainers import compile_utils

    outputs = _output_structure(model)
    names = {metric.name for metric in model.metrics if not isinstance(metric, compile_utils.CompileMetrics)}
    compiled_loss = getattr(model, "_compile_loss", None)
    if compiled_loss is not None:
        loss = compile_utils.CompileLoss(
            compiled_loss._user_loss, compiled_loss._user_loss_weights, output_names=compiled_loss.output_names
        )
        loss.build(outputs, outputs)
        names |= {metric.name for metric in loss.metrics}
    compiled_metrics = getattr(model, "_compile_metrics", None)
    if compiled_metrics is not None:
        metrics = compile_utils.CompileMetrics(
            compiled_metrics._user_metrics,
            compiled_metrics._user_weighted_metrics,
            output_names=compiled_metrics.output_names,
        )
        metrics.build(outputs, outputs)
        names |= _compiled_metric_names(metrics)
    return names


def _output_structure(model: Any) -> Any:
    structure = getattr(model, "_outputs_struct", None)
    if structure is not None:
        return structure
    outputs = model.outputs
    return outputs[0] if len(outputs) == 1 else outputs


def _compiled_metric_names(metrics: Any) -> set[str]:
    """Name built compile metrics as Keras 3.15 logs them: output prefix, then a suffix for repeats."""
    names: set[str] = set()
    for metric_lists, weighted in ((metrics._flat_metrics, False), (metrics._flat_weighted_metrics, True)):
        for metric_list in metric_lists:
            if not metric_list:
                continue
            prefix = f"{metric_list.output_name}_" if metric_list.output_name else ""
            for metric in metric_list.metrics:
                name = prefix + metric.name
                if weighted and name in names:
                    name = prefix + "weighted_" + metric.name
                names.add(_unique_name(name, names))
    return names


def _unique_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    index = 1
    while f"{name}_{index}" in taken:
        index += 1
    return f"{name}_{index}"


# Argument checks.


def _filepath_string(filepath: Any) -> str:
    if hasattr(filepath, "__fspath__"):
        filepath = filepath.__fspath__()
    if not isinstance(filepath, str) or not filepath:
        raise ValueError(f"Expected `filepath` to be a non-empty URL or path. Received: filepath={filepath!r}")
    return filepath


def _parse_fields(filepath: str) -> list[str]:
    """Return the field names in `filepath`, rejecting what Keras could not fill from its logs."""
    try:
        parsed = list(string.Formatter().parse(filepath))
    except ValueError as error:
        raise ValueError(
            f"Invalid filepath {filepath!r}: {error}. Write a literal brace as '{{{{' or '}}}}'. "
            f"Received: filepath={filepath!r}"
        ) from None
    fields = []
    for _, field_name, format_spec, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ValueError(
                f"Invalid filepath {filepath!r}: positional fields such as '{{}}' or '{{0}}' cannot be filled. "
                f"Name the field, e.g. {{epoch:02d}} or {{val_loss:.2f}}. Received: filepath={filepath!r}"
            )
        if not field_name.isidentifier() or "{" in (format_spec or ""):
            raise ValueError(
                f"Invalid filepath {filepath!r}: the field {{{field_name}}} must be a plain name such as "
                f"'epoch' or 'val_loss', without attributes, indexes or nested fields. Received: filepath={filepath!r}"
            )
        fields.append(field_name)
    return list(dict.fromkeys(fields))


def _last_folder_separator(filepath: str) -> int:
    """Return the index of the last '/' outside format fields, or -1 if there is none."""
    last = -1
    depth = 0
    index = 0
    while index < len(filepath):
        pair = filepath[index : index + 2]
        if depth == 0 and pair in ("{{", "}}"):
            index += 2
            continue
        character = filepath[index]
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
        elif character == "/" and depth == 0:
            last = index
        index += 1
    return last


def _name_pattern(name_template: str) -> re.Pattern[str]:
    """Return a regex that matches every file name `name_template` can produce."""
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(name_template):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append(r"[^/]+?")
    return re.compile("".join(parts))


def _check_suffix(filepath: str, save_weights_only: bool) -> None:
    if save_weights_only:
        allowed = (".weights.h5",)
        valid = filepath.endswith(allowed)
    else:
        allowed = (".keras", ".h5")
        # A ".weights.h5" name would make save_snapshot write weights only.
        valid = filepath.endswith(allowed) and not filepath.endswith(".weights.h5")
    if not valid:
        raise ValueError(
            f"Invalid filepath {filepath!r} for save_weights_only={save_weights_only}: the file name must "
            f"end with {' or '.join(allowed)}. Received: filepath={filepath!r}"
        )


def _check_save_freq(save_freq: Any) -> str | int:
    if save_freq == "epoch":
        return save_freq
    if isinstance(save_freq, bool) or not isinstance(save_freq, numbers.Integral) or save_freq < 1:
        raise ValueError(
            "Expected `save_freq` to be 'epoch' or a positive number of batches. "
            f"Received: save_freq={save_freq!r}"
        )
    return int(save_freq)


def _check_threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or _is_nan(value):
        raise ValueError(
            f"Expected `initial_value_threshold` to be a number or None. Received: initial_value_threshold={value!r}"
        )
    return float(value)


def _check_max_to_keep(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `max_to_keep` to be a positive integer or None. Received: max_to_keep={value!r}")
    return int(value)


def _check_policies(keep: Any) -> tuple[Any, ...]:
    if keep is None:
        return ()
    policies = tuple(keep) if isinstance(keep, (list, tuple)) else (keep,)
    for policy in policies:
        if not callable(getattr(policy, "keep", None)):
            raise TypeError(
                "Expected `keep` to hold retention policies such as statefs.retention.KeepBest(2, 'val_loss'). "
                f"Received: keep={keep!r}"
            )
    return policies


def _check_monitors_against_save_freq(monitors: dict[str, str], save_freq: str | int) -> None:
    if save_freq == "epoch":
        return
    for name, role in monitors.items():
        if name.startswith("val_"):
            raise ValueError(
                f"Cannot use the validation metric {name!r} as {role} with save_freq={save_freq!r}: "
                "validation metrics exist only at the end of an epoch, so no save after a number of "
                "batches could ever compare it. Use save_freq='epoch', or monitor a training metric "
                f"such as {name.removeprefix('val_')!r}. Received: monitor={name!r}, save_freq={save_freq!r}"
            )


# Sidecar records.


def _record_from_manifest(backend: Any, path: str, manifest: Any) -> SavedCheckpoint | None:
    metadata = manifest.metadata
    if metadata.get("writer") != WRITER:
        return None
    metrics = metadata.get("metrics")
    step = metadata.get("step")
    return SavedCheckpoint(
        url=backend.url(path),
        path=path,
        step=step if isinstance(step, int) else 0,
        created=manifest.created,
        metrics=metrics if isinstance(metrics, dict) else {},
        epoch=_optional_int(metadata.get("epoch")),
        batch=_optional_int(metadata.get("batch")),
    )


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _base_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _is_nan(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isnan(value)
