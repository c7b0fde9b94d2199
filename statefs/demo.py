"""`statefs demo`: store a model's state in several places, move it, and reload every copy.

The demo trains a small classifier on scikit-learn's handwritten digits,
keeps checkpoints, publishes two versions and saves a snapshot, migrates the
versions and the snapshot to other stores, and then reloads every copy in
one fresh Python process. It passes only if each reloaded copy classifies
the test set exactly as well as the in-memory model it was saved from.

With `storage="servers"`, S3 (moto) and GCS (gcp-storage-emulator) servers
run on 127.0.0.1 for the length of the demo. With `storage="file"`, two
local folders take the place of the two buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import fsspec.core

BUCKET = "statefs-demo"
CHECKPOINTS_KEPT = 3
SNAPSHOT_NAME = "digits.keras"
# Rows of load_digits() (1797 in all) drawn at random for training and for
# validation. The other 297 rows are the test set that scores every copy.
TRAIN_ROWS = 1200
VALIDATION_ROWS = 300
STORAGE_MODES = ("servers", "file")
TABLE_COLUMNS = ("copy", "stored at", "KiB", "seconds", "reloaded acc", "original acc", "equal")


@dataclasses.dataclass
class Stores:
    """The URLs the demo writes each kind of state to, and the settings that reach them."""

    checkpoints: str
    versions: str
    versions_copy: str
    snapshot: str
    snapshot_copy_folder: str
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def storage_options(self, url: str) -> dict[str, Any] | None:
        """Return the storage options for `url`, chosen by its protocol."""
        protocol = fsspec.core.split_protocol(url)[0]
        return self.options.get(protocol) if protocol else None


@dataclasses.dataclass
class StoredCopy:
    """One artefact of the demo: where it is, what it cost, and how it scores."""

    label: str
    url: str
    size: int
    seconds: float
    original_accuracy: float
    load: dict[str, Any]
    reloaded_accuracy: float | None = None
    error: str | None = None

    @property
    def equal(self) -> bool:
        return self.reloaded_accuracy == self.original_accuracy


def run_demo(storage: str = "servers", workdir: str | None = None, epochs: int = 5) -> int:
    """Run the demo and print what was stored where and how each copy reloads.

    Args:
        storage: "servers" for S3 and GCS emulators on 127.0.0.1, or "file"
            for local folders only.
        workdir: an empty or new folder for local copies; by default a
            temporary folder that is removed at the end.
        epochs: epochs of training before version 1; version 2 follows
            after as many more.

    Returns:
        0 if every reloaded copy has the same test accuracy as the model
        state it was saved from, 1 otherwise.

    Raises:
        ValueError: an invalid argument, or a `workdir` that is not empty.
    """
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_MODES)}. Received: storage={storage!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer. Received: epochs={epochs!r}")
    # TensorFlow reads this when it is imported, here and in the child process.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()

    with contextlib.ExitStack() as cleanup:
        folder = _prepare_workdir(workdir, cleanup)
        if storage == "servers":
            stores = _start_servers(folder, cleanup)
        else:
            stores = _local_stores(folder)
        copies = _train_and_store(stores, epochs)
        _reload_in_child(copies, stores)
        status = print_report(copies)
        if workdir is None:
            print(f"Removing the temporary folder {folder}; pass --workdir to keep the local copies.")
    print(f"Demo finished in {time.perf_counter() - started:.1f} s.")
    return status


def _prepare_workdir(workdir: str | None, cleanup: contextlib.ExitStack) -> str:
    if workdir is None:
        return cleanup.enter_context(tempfile.TemporaryDirectory(prefix="statefs-demo-"))
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ValueError(
            f"The demo folder {workdir} is not empty. The demo commits new checkpoints and versions "
            "and statefs never overwrites a committed unit, so choose an empty or new folder."
        )
    os.makedirs(workdir, exist_ok=True)
    return os.path.abspath(workdir)


def _start_servers(folder: str, cleanup: contextlib.ExitStack) -> Stores:
    from statefs.backends.emulators import GCSEmulator, S3Emulator

    s3 = cleanup.enter_context(S3Emulator())
    gcs = cleanup.enter_context(GCSEmulator())
    s3.create_bucket(BUCKET)
    gcs.create_bucket(BUCKET)
    print(f"S3 emulator (moto) at {s3.endpoint_url}, GCS emulator at {gcs.endpoint_url}; bucket {BUCKET} on each.")
    return Stores(
        checkpoints=f"s3://{BUCKET}/run/ckpt",
        versions=f"gs://{BUCKET}/models/digits",
        versions_copy=f"s3://{BUCKET}/models/digits",
        snapshot=f"s3://{BUCKET}/snapshots/{SNAPSHOT_NAME}",
        snapshot_copy_folder=os.path.join(folder, "exported", "snapshots"),
        options={"s3": s3.storage_options(), "gs": gcs.storage_options()},
        env={**s3.env(), **gcs.env()},
    )


def _local_stores(folder: str) -> Stores:
    # store-a takes the place of the S3 bucket and store-b of the GCS bucket in the servers mode.
    store_a = os.path.join(folder, "store-a")
    store_b = os.path.join(folder, "store-b")
    print(f"Local folders {store_a} and {store_b} stand in for two buckets.")
    return Stores(
        checkpoints=os.path.join(store_a, "run", "ckpt"),
        versions=os.path.join(store_b, "models", "digits"),
        versions_copy=os.path.join(store_a, "models", "digits"),
        snapshot=os.path.join(store_a, "snapshots", SNAPSHOT_NAME),
        snapshot_copy_folder=os.path.join(folder, "exported", "snapshots"),
    )


def load_data() -> dict[str, Any]:
    """Return scikit-learn's digits scaled to [0, 1], shuffled and split into train, validation and test arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=TRAIN_ROWS, random_state=0, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=VALIDATION_ROWS, random_state=0, stratify=y_rest
    )
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Hide what native code writes to file descriptor 2 inside the block, unless the block fails.

    NOTE: TensorFlow 2.21 writes absl INFO and ERROR lines (oneDNN, missing
    CUDA drivers) when it loads and when it first creates a tensor, before
    TF_CPP_MIN_LOG_LEVEL takes effect, so only a redirect keeps them out.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def build_model() -> Any:
    """Return the demo's digits classifier, compiled with Adam."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def evaluate_accuracy(model: Any, test: tuple[Any, Any]) -> float:
    """Return the fraction of test digits that `model` classifies correctly."""
    x, y = test
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    return float((predicted == y).mean())


def _train_and_store(stores: Stores, epochs: int) -> list[StoredCopy]:
    """Train in two phases, storing checkpoints, two versions and a snapshot, then migrate them."""
    import statefs

    data = load_data()
    with _native_stderr_captured():
        model = build_model()
    manager = statefs.CheckpointManager(
        stores.checkpoints, max_to_keep=CHECKPOINTS_KEPT, storage_options=stores.storage_options(stores.checkpoints)
    )
    registry = statefs.VersionRegistry(stores.versions, storage_options=stores.storage_options(stores.versions))
    save_timer = _SaveTimer()
    callbacks = save_timer.around(manager.callback())
    copies = []

    print(f"Training for {epochs} epochs, with a checkpoint after each epoch at {stores.checkpoints}.")
    history = _fit(model, data, 0, epochs, callbacks)
    copies.append(_publish(registry, model, data, history, epochs))

    print(f"Training for {epochs} more epochs.")
    history = _fit(model, data, epochs, 2 * epochs, callbacks)
    copies.append(_publish(registry, model, data, history, 2 * epochs))
    accuracy = evaluate_accuracy(model, data["test"])
    copies.insert(0, _latest_checkpoint(manager, stores, accuracy, save_timer.last_seconds))
    copies.append(_save_snapshot(model, stores, accuracy))

    copies.extend(_migrate_versions(stores, copies))
    copies.append(_migrate_snapshot(stores, copies[-1]))
    return copies


def _fit(model: Any, data: dict[str, Any], initial_epoch: int, epochs: int, callbacks: list[Any]) -> Any:
    x, y = data["train"]
    return model.fit(
        x,
        y,
        validation_data=data["validation"],
        initial_epoch=initial_epoch,
        epochs=epochs,
        batch_size=32,
        callbacks=callbacks,
        verbose=0,
    )


class _SaveTimer:
    """Measures how long the checkpoint callback takes at the end of each epoch."""

    def __init__(self) -> None:
        self.started = 0.0
        self.last_seconds = 0.0

    def around(self, callback: Any) -> list[Any]:
        """Return `callback` between two callbacks that read the clock, because Keras calls them in list order."""
        import keras

        def start(epoch: int, logs: Any) -> None:
            self.started = time.perf_counter()

        def stop(epoch: int, logs: Any) -> None:
            self.last_seconds = time.perf_counter() - self.started

        return [keras.callbacks.LambdaCallback(on_epoch_end=start), callback, keras.callbacks.LambdaCallback(on_epoch_end=stop)]


def _publish(registry: Any, model: Any, data: dict[str, Any], history: Any, epochs: int) -> StoredCopy:
    val_accuracy = float(history.history["val_accuracy"][-1])
    started = time.perf_counter()
    number = registry.publish(model, metadata={"val_accuracy": val_accuracy, "epochs": epochs})
    seconds = time.perf_counter() - started
    url = f"{registry.url}/{number}"
    print(f"Published version {number} (after {epochs} epochs, val_accuracy {val_accuracy:.4f}) at {url}.")
    return StoredCopy(
        label=f"version {number}",
        url=url,
        size=registry.manifest(number).total_size(),
        seconds=seconds,
        original_accuracy=evaluate_accuracy(model, data["test"]),
        load={"kind": "version", "root": registry.url, "version": number},
    )


def _latest_checkpoint(manager: Any, stores: Stores, accuracy: float, seconds: float) -> StoredCopy:
    from statefs import backends
    from statefs.commit import require_manifest

    checkpoints = manager.list()
    latest = checkpoints[-1]
    print(f"Kept {len(checkpoints)} checkpoints (steps {', '.join(str(c.step) for c in checkpoints)}) at {manager.url}.")
    backend, path = backends.resolve(latest.url, stores.storage_options(latest.url))
    return StoredCopy(
        label=f"checkpoint step {latest.step}",
        url=latest.url,
        size=require_manifest(backend, path, "checkpoint").total_size(),
        seconds=seconds,
        original_accuracy=accuracy,
        load={"kind": "checkpoint", "root": stores.checkpoints, "step": latest.step},
    )


def _save_snapshot(model: Any, stores: Stores, accuracy: float) -> StoredCopy:
    import statefs

    started = time.perf_counter()
    snapshot = statefs.save_snapshot(model, stores.snapshot, storage_options=stores.storage_options(stores.snapshot))
    seconds = time.perf_counter() - started
    print(f"Saved snapshot {snapshot.url}.")
    return StoredCopy(
        label="snapshot",
        url=snapshot.url,
        size=snapshot.size,
        seconds=seconds,
        original_accuracy=accuracy,
        load={"kind": "snapshot", "url": stores.snapshot},
    )


def _migrate_versions(stores: Stores, copies: list[StoredCopy]) -> list[StoredCopy]:
    import statefs

    report = statefs.migrate(
        stores.versions,
        stores.versions_copy,
        src_storage_options=stores.storage_options(stores.versions),
        dst_storage_options=stores.storage_options(stores.versions_copy),
    )
    originals = {copy.url: copy for copy in copies}
    migrated = []
    for item in report.items:
        original = originals[item.source]
        number = original.load["version"]
        print(f"Migrated version {number}: {item.source} → {item.destination}.")
        migrated.append(
            StoredCopy(
                label=f"version {number}, migrated",
                url=item.destination,
                size=item.bytes,
                seconds=item.seconds,
                original_accuracy=original.original_accuracy,
                load={"kind": "version", "root": stores.versions_copy, "version": number},
            )
        )
    return migrated


def _migrate_snapshot(stores: Stores, snapshot: StoredCopy) -> StoredCopy:
    import statefs

    report = statefs.migrate(
        stores.snapshot,
        stores.snapshot_copy_folder,
        src_storage_options=stores.storage_options(stores.snapshot),
    )
    item = report.items[0]
    print(f"Migrated the snapshot: {item.source} → {item.destination}.")
    return StoredCopy(
        label="snapshot, migrated",
        url=item.destination,
        size=item.bytes,
        seconds=item.seconds,
        original_accuracy=snapshot.original_accuracy,
        load={"kind": "snapshot", "url": item.destination},
    )


def _reload_in_child(copies: list[StoredCopy], stores: Stores) -> None:
    """Reload every copy in one new Python process and record its test accuracy or error."""
    print(f"Reloading {len(copies)} copies in a fresh Python process.")
    env = {**os.environ, **stores.env, "TF_CPP_MIN_LOG_LEVEL": "2"}
    request = json.dumps([copy.load for copy in copies])
    completed = subprocess.run(
        [sys.executable, "-m", "statefs.demo", request],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        raise ChildProcessError(
            f"The reload process failed with exit status {completed.returncode}. Its error output is above."
        )
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for copy, result in zip(copies, results):
        copy.reloaded_accuracy = result.get("accuracy")
        copy.error = result.get("error")


def reload_copies(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load each requested copy and return its test accuracy, or the error that stopped it."""
    test = load_data()["test"]
    results = []
    for request in requests:
        try:
            model = _load_copy(request)
        # A copy that fails to load is a result to report, and the others still get scored.
        except Exception as error:
            results.append({"error": f"{type(error).__name__}: {error}"})
            continue
        results.append({"accuracy": evaluate_accuracy(model, test)})
    return results


def _load_copy(request: dict[str, Any]) -> Any:
    """Load one copy, reaching its store through fsspec's environment variables."""
    import statefs

    if request["kind"] == "checkpoint":
        model = build_model()
        statefs.CheckpointManager(request["root"], max_to_keep=None).restore(model, request["step"])
        return model
    if request["kind"] == "version":
        return statefs.VersionRegistry(request["root"]).load(request["version"])
    return statefs.load_snapshot(request["url"])


def print_report(copies: list[StoredCopy]) -> int:
    """Print the table of copies and return 0 if every reloaded accuracy equals its original."""
    from statefs.cli import format_table

    rows = [
        (
            copy.label,
            copy.url,
            f"{copy.size / 1024:.1f}",
            f"{copy.seconds:.2f}",
            "failed" if copy.error else f"{copy.reloaded_accuracy:.4f}",
            f"{copy.original_accuracy:.4f}",
            "yes" if copy.equal else "NO",
        )
        for copy in copies
    ]
    print()
    for line in format_table(TABLE_COLUMNS, rows):
        print(line)
    print("seconds: time taken to save, publish or migrate the copy; acc: accuracy on the test digits.")
    print()

    different = [copy for copy in copies if not copy.equal]
    if not different:
        print(f"All {len(copies)} copies, reloaded in a fresh process, score exactly as the model state they were saved from.")
        return 0
    print("Reloaded test accuracy differs from the original for:", file=sys.stderr)
    for copy in different:
        found = copy.error or f"{copy.reloaded_accuracy!r} instead of {copy.original_accuracy!r}"
        print(f"  {copy.label} at {copy.url}: {found}", file=sys.stderr)
    return 1


def _main(argv: list[str]) -> int:
    """Reload the copies listed as JSON in argv[0] and print their results as a JSON list."""
    if len(argv) != 1:
        print("usage: python -m statefs.demo '<JSON list of copies to reload>'", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = reload_copies(json.loads(argv[0]))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
