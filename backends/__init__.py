"""Backends, which carry bytes to a store: the Backend contract and the registry.

A backend is chosen from the fsspec filesystem that a URL resolves to. The
built-in ones cover local disk, `memory://`, `s3://` and `gs://`. Other
packages add theirs through the entry-point group `statefs.backends`, each
entry naming a `Backend` subclass. Any other fsspec protocol falls back to
`GenericBackend`.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import fsspec
import fsspec.core
from fsspec.registry import known_implementations

from statefs.backends.base import Backend, Capabilities
from statefs.backends.gcs import GCSBackend
from statefs.backends.generic import BackendCapabilityWarning, GenericBackend
from statefs.backends.local import LocalBackend
from statefs.backends.memory import MemoryBackend
from statefs.backends.s3 import S3Backend

__all__ = [
    "Backend",
    "BackendCapabilityWarning",
    "Capabilities",
    "GenericBackend",
    "register_backend",
    "resolve",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "statefs.backends"

_registry: dict[str, type[Backend]] = {}
_entry_points_loaded = False


def register_backend(protocol: str, backend: type[Backend], *, overwrite: bool = False) -> None:
    """Use `backend` for URLs whose fsspec protocol is `protocol`.

    Raises:
        ValueError: another backend is registered for `protocol` and
            `overwrite` is False.
    """
    registered = _registry.get(protocol)
    if registered is not None and registered is not backend and not overwrite:
        raise ValueError(
            f"A backend is already registered for protocol {protocol!r}: "
            f"{registered.__module__}.{registered.__qualname__}. "
            "Pass overwrite=True to replace it."
        )
    _registry[protocol] = backend


for _backend in (LocalBackend, MemoryBackend, S3Backend, GCSBackend):
    for _protocol in _backend.protocols:
        register_backend(_protocol, _backend)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _registry:
            logger.debug("Entry point %s ignored: protocol already registered", entry_point.name)
            continue
        try:
            register_backend(entry_point.name, entry_point.load())
        except Exception as error:  # a broken plugin must not break other protocols
            logger.warning("Cannot load statefs backend %r: %s", entry_point.value, error)


def backend_class(protocol: str | tuple[str, ...]) -> type[Backend]:
    """Return the backend class for an fsspec protocol name or tuple of names."""
    names = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    for attempt in range(2):
        for name in names:
            if name in _registry:
                return _registry[name]
        if attempt == 0:
            _load_entry_points()
    return GenericBackend


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Backend, str]:
    """Return the backend for `url` and the path inside its filesystem.

    `storage_options` go to the fsspec filesystem untouched.

    Raises:
        ImportError: the package that implements the URL's protocol is not
            installed; the message names it.
        ValueError: fsspec has no implementation for the URL's protocol.
    """
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        raise ImportError(_install_hint(url, error)) from error
    backend = backend_class(fs.protocol)(fs)
    return backend, path


def _install_hint(url: str, error: ImportError) -> str:
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    # The attribute `fsspec.registry` is a read-only mapping that hides the
    # module of that name, so `known_implementations` is imported directly.
    known = known_implementations.get(protocol, {})
    hint = known.get("err") or str(error)
    return f"Cannot open {url!r}: the {protocol!r} protocol needs a package that is not installed. {hint}"
