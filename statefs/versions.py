"""Numbered model versions in the TensorFlow Serving layout."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from statefs import backends
from statefs.commit import (
    UnitWriter,
    committed_manifest_or_none,
    download_unit,
    list_children,
    require_manifest,
    staging_folder,
)
from statefs.errors import ManifestError, UnitExistsError
from statefs.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"^\d+$")
SAVED_MODEL_DIR = "saved_model"
# TF Serving starts loading a version when saved_model.pb appears, so that
# file goes after the variables, and the manifest after everything.
SAVED_MODEL_LAST = ("saved_model.pb",)


class VersionRegistry:
    """Publishes and loads numbered model versions under one root URL.

    Version `N` is the folder `<url>/<N>/`: a TensorFlow SavedModel that
    TF Serving can load (`saved_model.pb`, `variables/`), the Keras file
    `model.keras` beside it so Keras can load the version back, and a
    manifest written last. Only committed versions are listed or loaded;
    names that are not plain numbers never count as versions.

    Example:

    ```python
    registry = statefs.VersionRegistry("gs://bucket/models/digits")
    number = registry.publish(model, metadata={"val_accuracy": 0.97})
    registry.list()       # [1, 2, ...]
    model = registry.load(number)
    ```

    Args:
        url: root folder of the versions, at any fsspec URL.
        storage_options: passed to the fsspec filesystem untouched.
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith((".keras", ".h5")):
            raise ValueError(
                f"Invalid version root {url!r}: versions live in a folder, one subfolder per number, "
                "so the root cannot be a model file. Use save_snapshot() for a single file, "
                "or drop the suffix."
            )
        self.backend, self.path = backends.resolve(url, storage_options)
        self.backend.check(self.path)
        self.url = self.backend.url(self.path)

    def __repr__(self) -> str:
        return f"VersionRegistry({self.url!r})"

    def list(self) -> list[int]:
        """Return the committed version numbers in ascending order."""
        return [number for number, _ in self._committed()]

    def latest(self) -> int | None:
        """Return the highest committed version number, or None."""
        versions = self.list()
        return versions[-1] if versions else None

    def manifest(self, version: int) -> Manifest:
        """Return the manifest of a committed version (files, metadata, library versions)."""
        return require_manifest(self.backend, self._version_path(version), f"version {version}")

    def publish(self, model: Any, *, version: int | None = None, metadata: dict[str, Any] | None = None) -> int:
        """Publish `model` as a new version and return its number.

        Args:
            model: a built Keras model.
            version: the number to publish as; by default one more than the
                highest number present, committed or not.
            metadata: JSON-serializable data stored in the manifest.

        Raises:
            UnitExistsError: `version` is already published, or is being
                written by another publisher.
        """
        from statefs import keras_io

        with staging_folder("version") as staging:
            keras_io.export_saved_model(model, os.path.join(staging, SAVED_MODEL_DIR))
            model.save(os.path.join(staging, SAVED_MODEL_DIR, keras_io.KERAS_FILE))
            return self._upload(os.path.join(staging, SAVED_MODEL_DIR), version, dict(metadata or {}))

    def load(self, version: int | None = None, *, verify_checksums: bool = True, compile: bool = True) -> Any:
        """Load a version as a Keras model; the latest by default.

        Raises:
            FileNotFoundError: the version is not committed.
            IntegrityError: a downloaded file differs from the manifest.
            ManifestError: the manifest is invalid or lists no model.keras.
        """
        from statefs import keras_io

        if version is None:
            version = self.latest()
            if version is None:
                raise FileNotFoundError(f"No committed version under {self.url} to load.")
        path = self._version_path(version)
        manifest = require_manifest(self.backend, path, f"version {version}")
        if keras_io.KERAS_FILE not in manifest.files:
            raise ManifestError(
                f"Invalid manifest {self.backend.url(self.backend.join(path, MANIFEST_NAME))}: version {version} "
                f"lists no {keras_io.KERAS_FILE}, which load() reads. Load the SavedModel with TensorFlow instead."
            )
        subset = Manifest(kind=manifest.kind, files={keras_io.KERAS_FILE: manifest.files[keras_io.KERAS_FILE]})
        with staging_folder("load") as staging:
            download_unit(self.backend, path, subset, staging, verify_checksums=verify_checksums)
            return keras_io.load_model_file(os.path.join(staging, keras_io.KERAS_FILE), compile=compile)

    def _upload(self, local_folder: str, version: int | None, metadata: dict[str, Any]) -> int:
        """Claim a number, upload the folder, commit; retry the next number on a lost race."""
        while True:
            number = self._next_number() if version is None else _check_version(version)
            metadata["version"] = number
            writer = UnitWriter(self.backend, self._version_path(number), kind="version", metadata=metadata)
            try:
                with writer.claimed():
                    writer.put_folder(local_folder, last=SAVED_MODEL_LAST)
                    writer.commit()
                return number
            except UnitExistsError:
                if version is not None:
                    raise
                logger.info("Version %d was taken by another publisher; trying the next number", number)

    def _committed(self) -> list[tuple[int, str]]:
        committed = []
        for number, path in self._numbered():
            manifest = committed_manifest_or_none(self.backend, path)
            if manifest is not None and manifest.kind == "version":
                committed.append((number, path))
        return committed

    def _numbered(self) -> list[tuple[int, str]]:
        children = list_children(self.backend, self.path)
        return sorted((int(name), path) for name, path in children.items() if VERSION_NAME.match(name))

    def _next_number(self) -> int:
        numbered = self._numbered()
        return numbered[-1][0] + 1 if numbered else 1

    def _version_path(self, version: int) -> str:
        return self.backend.join(self.path, str(_check_version(version)))


def _check_version(version: Any) -> int:
    if isinstance(version, str) and VERSION_NAME.match(version):
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"A version must be a non-negative integer. Received: version={version!r}")
    return version
