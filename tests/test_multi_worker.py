"""Checkpoints under `tf.distribute.MultiWorkerMirroredStrategy` with two worker processes.

Each run starts two `multi_worker_child.py` processes that form a cluster on
127.0.0.1, train the same model together, and both call
`CheckpointManager.save` on one URL. Only the chief may write. The other
worker's backend rejects every write, so a write from it would fail its
save. Each two-worker run takes several seconds, so it is a module
fixture and the tests read its results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from conftest import BUCKET, Store, stored_files

import statefs
from statefs.manifest import MANIFEST_NAME

pytestmark = pytest.mark.slow

CHILD = pathlib.Path(__file__).with_name("multi_worker_child.py")
# A run took 10 to 30 seconds on a shared two-core machine. The limit only
# bounds a run that hangs in a collective.
WORKER_TIMEOUT = 240.0


@dataclasses.dataclass
class WorkerRun:
    """What one two-worker run reported and left in its store."""

    root: Store
    reports: list[dict[str, Any]]
    files: dict[str, int]
    trained_weights_file: pathlib.Path

    @property
    def chief(self) -> dict[str, Any]:
        return self.reports[0]

    @property
    def other(self) -> dict[str, Any]:
        return self.reports[1]


def new_root(backend: str, request: pytest.FixtureRequest, folder: pathlib.Path) -> Store:
    """Return an empty root on `backend` that child processes reach through their environment."""
    if backend == "file":
        return Store(backend, str(folder / "store"), None, {})
    server = request.getfixturevalue("s3_server")
    server.create_bucket(BUCKET)
    return Store(backend, f"s3://{BUCKET}/multi-worker-{uuid.uuid4().hex[:8]}", server.storage_options(), server.env())


def free_ports(count: int) -> list[int]:
    """Return ports on 127.0.0.1 that were free a moment ago; all are held at once so they differ."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def run_workers(root: Store, mode: str, folder: pathlib.Path, *args: str) -> list[dict[str, Any]]:
    """Run two workers on `root`; return their reports, chief (task 0) first."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    logs = [(folder / f"worker-{index}.out", folder / f"worker-{index}.err") for index in range(2)]
    processes: list[subprocess.Popen] = []
    try:
        for index, (out_path, err_path) in enumerate(logs):
            task = {"type": "worker", "index": index}
            env = {**os.environ, **root.env, "CUDA_VISIBLE_DEVICES": "", "TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}
            with open(out_path, "w") as out, open(err_path, "w") as err:
                processes.append(subprocess.Popen([sys.executable, str(CHILD), root.root, mode, *args], env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + WORKER_TIMEOUT
        for process in processes:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"The workers did not finish within {WORKER_TIMEOUT:.0f} s.\n{_error_tails(logs)}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    reports = []
    for process, (out_path, err_path) in zip(processes, logs):
        assert process.returncode == 0, f"A worker exited with code {process.returncode}.\n{_error_tails(logs)}"
        reports.append(json.loads(out_path.read_text().splitlines()[-1]))
    return reports


def _error_tails(logs: list[tuple[pathlib.Path, pathlib.Path]]) -> str:
    return "\n".join(f"--- worker {index} stderr:\n{err_path.read_text()[-3000:]}" for index, (_, err_path) in enumerate(logs))


@pytest.fixture(scope="module", params=("file", "s3"))
def saved(request, tmp_path_factory) -> WorkerRun:
    """Two workers that train, save and restore."""
    folder = tmp_path_factory.mktemp(f"saved-{request.param}")
    root = new_root(request.param, request, folder)
    trained_weights_file = folder / "trained.weights.h5"
    reports = run_workers(root, "save", folder, str(trained_weights_file))
    return WorkerRun(root, reports, stored_files(root), trained_weights_file)


@pytest.fixture(scope="module")
def failed(request, tmp_path_factory) -> WorkerRun:
    """Two workers whose chief cannot upload the checkpoint's payload to S3.

    The failure path runs on one backend only: what the workers do after the
    chief's error does not depend on the store.
    """
    folder = tmp_path_factory.mktemp("failed")
    root = new_root("s3", request, folder)
    reports = run_workers(root, "fail-chief-upload", folder)
    return WorkerRun(root, reports, stored_files(root), folder / "unused")


def test_task_zero_is_the_only_chief(saved):
    assert saved.chief["task"] == "worker:0"
    assert saved.chief["is_chief"] is True
    assert saved.other["task"] == "worker:1"
    assert saved.other["is_chief"] is False


def test_context_found_inside_scope_and_through_model(saved):
    for report in saved.reports:
        assert report["task_in_scope"] == report["task"]


def test_workers_train_the_same_state(saved):
    assert saved.chief["trained"] == saved.other["trained"]


def test_non_chief_save_succeeds_without_writing(saved):
    assert "error" not in saved.other
    assert "restored" in saved.other


def test_every_worker_restores_the_trained_state(saved):
    for report in saved.reports:
        assert report["restored"] == report["trained"], report["task"]


def test_store_holds_only_the_chief_checkpoint(saved):
    unit = f"ckpt-{saved.chief['step']}"
    assert {path.split("/", 1)[0] for path in saved.files} == {unit}
    assert f"{unit}/{MANIFEST_NAME}" in saved.files


def test_saved_checkpoint_verifies(saved):
    report = statefs.verify(saved.root.root, storage_options=saved.root.storage_options)
    assert report.ok, report.problems
    assert [url.rstrip("/").rsplit("/", 1)[-1] for url in report.units] == [f"ckpt-{saved.chief['step']}"]


def test_single_process_restores_multi_worker_checkpoint(saved):
    from multi_worker_child import build_model, state_digest

    model = build_model()
    statefs.CheckpointManager(saved.root.root, storage_options=saved.root.storage_options).restore(model, restore_rng=False)
    assert state_digest(model) == saved.chief["trained"]


def test_multi_worker_save_equals_single_worker_save(saved, request, tmp_path):
    from multi_worker_child import build_model, state_digest

    from statefs import keras_io

    trained = build_model()
    keras_io.load_weights(trained, str(saved.trained_weights_file))
    assert state_digest(trained) == saved.chief["trained"]

    alone = new_root(saved.root.backend, request, tmp_path)
    manager = statefs.CheckpointManager(alone.root, storage_options=alone.storage_options)
    manager.save(trained, step=saved.chief["step"])
    restored = build_model()
    manager.restore(restored, restore_rng=False)
    assert state_digest(restored) == saved.chief["restored"]


def test_chief_save_failure_raises_on_chief(failed):
    assert failed.chief["error"]["type"] == "PermissionError"
    assert "read-only" in failed.chief["error"]["message"]


def test_chief_save_failure_raises_on_non_chief(failed):
    assert failed.other["error"]["type"] == "RuntimeError"
    assert "chief worker failed" in failed.other["error"]["message"]


def test_chief_save_failure_leaves_nothing(failed):
    assert failed.files == {}


def test_worker_context_none_without_tensorflow(run_fresh):
    output = run_fresh(
        """
        import sys
        from statefs import distribute
        print(distribute.worker_context() is None, "tensorflow" in sys.modules)
        """
    )
    assert output.split() == ["True", "False"]


def test_worker_context_none_for_one_process(run_fresh):
    output = run_fresh(
        """
        import json, os
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.pop("TF_CONFIG", None)
        import keras
        import tensorflow as tf
        from statefs import distribute

        def build():
            return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

        found = {"no strategy": distribute.worker_context(build())}
        one_worker = tf.distribute.MultiWorkerMirroredStrategy()
        with one_worker.scope():
            found["one-worker MultiWorkerMirroredStrategy, in scope"] = distribute.worker_context()
            model = build()
        found["one-worker MultiWorkerMirroredStrategy, through the model"] = distribute.worker_context(model)
        with tf.distribute.MirroredStrategy().scope():
            found["MirroredStrategy"] = distribute.worker_context(build())
        print(json.dumps({case: context is None for case, context in found.items()}))
        """
    )
    found = json.loads(output.splitlines()[-1])
    assert len(found) == 4
    for case, is_none in found.items():
        assert is_none, case
