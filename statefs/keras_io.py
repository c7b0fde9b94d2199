"""Keras and TensorFlow serialization to and from local files.

Everything here reads or writes local paths only: no URL ever reaches h5py
or `tf.io.gfile`. The callers stage files in a temporary folder and move
bytes through a backend. TensorFlow is imported inside the functions, so
that `import statefs` stays fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

logger = logging.getLogger(__name__)

# ".weights.h5" comes before ".h5", which it also ends with.
SNAPSHOT_FORMATS = {".weights.h5": "weights", ".keras": "keras", ".h5": "h5"}
KERAS_FILE = "model.keras"


class LegacyCompileWarning(UserWarning):
    """A legacy `.h5` model was loaded without its compile settings."""


def snapshot_format(url: str) -> str:
    """Return "weights", "keras" or "h5" from the suffix of `url`.

    Raises:
        ValueError: the suffix is not one of the supported ones.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix, kind in SNAPSHOT_FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    raise ValueError(
        f"Invalid snapshot URL {url!r}: the file name must end with one of "
        f"{', '.join(SNAPSHOT_FORMATS)}, which selects the format. Received: url={url!r}"
    )


def snapshot_suffix(url: str) -> str:
    fmt = snapshot_format(url)
    return next(suffix for suffix, kind in SNAPSHOT_FORMATS.items() if kind == fmt)


def save_model_file(model: Any, path: str) -> None:
    """Save `model` to the local file `path` in the format its suffix names."""
    fmt = snapshot_format(path)
    if fmt == "weights":
        model.save_weights(path)
    elif fmt == "h5":
        _save_h5_keeping_compile_config(model, path)
    else:
        model.save(path)


def _save_h5_keeping_compile_config(model: Any, path: str) -> None:
    """Save a legacy `.h5` file without losing the optimizer from the model's compile config.

    Keras 3.15's HDF5 writer removes "optimizer" from the model's own compile
    config (`model_metadata` in keras/src/legacy/saving/saving_utils.py), so a
    later `.keras` save of the same model would record no optimizer and load
    with a default RMSprop. The entries are put back after the save.
    """
    compile_config = getattr(getattr(model, "_compile_config", None), "config", None)
    kept = dict(compile_config) if isinstance(compile_config, dict) else None
    try:
        model.save(path)
    finally:
        if kept is not None:
            compile_config.update(kept)


def load_model_file(path: str, *, model: Any = None, compile: bool = True, source: str | None = None) -> Any:
    """Load a model from the local file `path`; a weights file loads into `model`.

    A legacy `.h5` model whose compiled loss or metrics Keras 3 cannot
    deserialize (such as `loss="mse"`) is loaded uncompiled, with a
    LegacyCompileWarning, rather than not at all. `source` is the URL that
    the staged file came from, named in errors and warnings.
    """
    import keras

    source = source or os.path.basename(path)
    fmt = snapshot_format(path)
    if fmt == "weights":
        if model is None:
            raise ValueError(
                f"{source} contains weights only, so it loads into an existing model. "
                "Pass the model with the same architecture: load_snapshot(url, model=model)."
            )
        load_weights(model, path)
        return model
    if fmt == "h5" and compile:
        try:
            return keras.saving.load_model(path)
        except (TypeError, ValueError) as error:
            warnings.warn(
                f"Loaded {source} without its compile settings, because Keras cannot "
                f"restore them from the legacy HDF5 format ({error}). Call model.compile() before "
                "training or evaluating it.",
                LegacyCompileWarning,
                stacklevel=2,
            )
    return keras.saving.load_model(path, compile=compile and fmt != "h5")


def load_weights(model: Any, path: str) -> None:
    """Load weights and optimizer state saved by `model.save_weights` into `model`.

    Keras skips optimizer variables that do not exist yet, so the optimizer is
    built first: the restored iterations and slots are the saved ones before
    any new training step.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built and model.built:
        optimizer.build(model.trainable_variables)
    model.load_weights(path)


def export_saved_model(model: Any, folder: str) -> None:
    """Write `model` as a TensorFlow SavedModel for serving into `folder`."""
    model.export(folder, format="tf_saved_model", verbose=False)


def framework_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__}


def training_step(model: Any) -> int | None:
    """Return the optimizer's iteration count, or None for a model without one."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return None
    return int(optimizer.iterations.numpy())
