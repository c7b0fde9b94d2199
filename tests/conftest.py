"""Fixtures: real S3 and GCS servers on 127.0.0.1, and one store per backend.

`store` is parametrized over file, memory, s3 and gs, so a test that takes
it runs once per backend. The servers start once per session, on first use;
every test gets empty buckets and fresh fsspec filesystem instances.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from statefs.backends.emulators import GCSEmulator, S3Emulator  # noqa: E402

BUCKET = "statefs-test"
BACKENDS = ("file", "memory", "s3", "gs")


@dataclasses.dataclass
class Store:
    """A fresh, empty root on one backend, with the options to reach it."""

    backend: str
    root: str
    storage_options: dict[str, Any] | None
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def fs(self) -> fsspec.AbstractFileSystem:
        """Return a new filesystem instance that shares no cache with statefs's."""
        fs, _ = fsspec.core.url_to_fs(self.root, skip_instance_cache=True, **(self.storage_options or {}))
        return fs

    def path(self, *parts: str) -> str:
        """Return the filesystem path (no protocol) of a URL under the root."""
        return fsspec.core.url_to_fs(self.url(*parts), **(self.storage_options or {}))[1]


@pytest.fixture(scope="session")
def s3_server():
    server = S3Emulator().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    server = GCSEmulator().start()
    yield server
    server.stop()


def _clear_fsspec_caches() -> None:
    for protocol in ("s3", "gs", "memory", "file"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except (ImportError, ValueError):
            pass
    fsspec.get_filesystem_class("memory").store.clear()
    fsspec.get_filesystem_class("memory").pseudo_dirs[:] = [""]


def make_store(backend: str, request: pytest.FixtureRequest, tmp_path) -> Store:
    _clear_fsspec_caches()
    unique = uuid.uuid4().hex[:8]
    if backend == "file":
        return Store(backend, str(tmp_path / "store"), None, {})
    if backend == "memory":
        return Store(backend, f"memory://root-{unique}", None, {})
    server = request.getfixturevalue("s3_server" if backend == "s3" else "gcs_server")
    server.reset()
    server.create_bucket(BUCKET)
    protocol = "s3" if backend == "s3" else "gs"
    return Store(backend, f"{protocol}://{BUCKET}/root-{unique}", server.storage_options(), server.env())


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Store:
    """An empty root on each backend in turn."""
    return make_store(request.param, request, tmp_path)


@pytest.fixture(params=("file", "s3", "gs"))
def shared_store(request, tmp_path) -> Store:
    """An empty root on each backend that a child process can reach too."""
    return make_store(request.param, request, tmp_path)


@pytest.fixture
def other_store(request, tmp_path) -> Any:
    """A factory for a second empty root on a named backend, for migrations."""

    def factory(backend: str) -> Store:
        return make_store_keeping(backend, request, tmp_path / f"other-{backend}")

    return factory


def make_store_keeping(backend: str, request: pytest.FixtureRequest, folder) -> Store:
    """Like make_store, but leaves caches and servers as they are."""
    unique = uuid.uuid4().hex[:8]
    if backend == "file":
        return Store(backend, str(folder), None, {})
    if backend == "memory":
        return Store(backend, f"memory://other-{unique}", None, {})
    server = request.getfixturevalue("s3_server" if backend == "s3" else "gcs_server")
    protocol = "s3" if backend == "s3" else "gs"
    other_bucket = f"{BUCKET}-other"
    try:
        server.create_bucket(other_bucket)
    except (FileExistsError, OSError):
        pass
    return Store(backend, f"{protocol}://{other_bucket}/root-{unique}", server.storage_options(), server.env())


@pytest.fixture
def run_fresh():
    """Run Python code in a new process with a store's settings in its environment; return stdout."""

    def run(code: str, *stores: Store, timeout: float = 300) -> str:
        env = dict(os.environ)
        for store in stores:
            env.update(store.env)
        completed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert completed.returncode == 0, f"child process failed:\n{completed.stderr[-4000:]}"
        return completed.stdout

    return run


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's handwritten digits, split into train and test arrays."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    return x[:1500], y[:1500], x[1500:], y[1500:]


def build_model(compile: bool = True, loss: str = "sparse_categorical_crossentropy"):
    """Return a small digits classifier, compiled with Adam."""
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    if compile:
        model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def trained(digits):
    """A classifier trained for one epoch, shared by the tests of a module that only save it."""
    model = build_model()
    x, y, _, _ = digits
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return model


def stored_files(store, name: str = "") -> dict[str, int]:
    """Return {path relative to `name`: size} as a new filesystem instance lists them."""
    fs = store.fs()
    root = store.path(name).rstrip("/") + "/"
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(root):]: info["size"] for path, info in found.items() if info.get("type") != "directory"}


@pytest.fixture
def model(digits):
    """A digits classifier trained for one epoch, so its optimizer has state."""
    trained = build_model()
    x, y, _, _ = digits
    trained.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return trained


def predictions_equal(first, second, x) -> bool:
    return np.array_equal(first.predict(x, verbose=0), second.predict(x, verbose=0))


class FailingWriter:
    """A file object that passes `limit` bytes to `handle`, then fails like a dropped connection."""

    def __init__(self, handle, limit: int):
        self.handle = handle
        self.remaining = limit

    def write(self, data: bytes) -> int:
        if len(data) > self.remaining:
            self.handle.write(data[: self.remaining])
            raise ConnectionResetError("connection reset by peer during upload")
        self.remaining -= len(data)
        return self.handle.write(data)
