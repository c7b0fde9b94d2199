"""Crash trials: workers that save, publish or migrate until they are SIGKILLed.

Run as a script, this module is a fork server. It imports statefs, s3fs and
gcsfs once, then reads one JSON request per line on stdin and forks a worker
for each. The worker repeats one operation (checkpoint save, version
publish, or root migration) until it is killed. It writes one JSON event per
line to stdout: a `phase` event before each step of the commit protocol,
and a `done` event after each operation returns. The server reaps the
worker and writes an `ended` event with its exit code. Forking from a
process that has already imported everything makes a new worker cost
milliseconds instead of the second that a fresh interpreter needs.

The worker never imports TensorFlow. The model it saves is a stand-in built
from files that the parent prepared once from real Keras models (variable
values, a SavedModel and a `.keras` file), so the parent can restore what
survives with Keras. A checkpoint captures the stand-in's variables with
statefs's own code, and a version copies the prepared files in place of
Keras's serialization. Every byte goes through statefs.

Imported as a module, it gives the parent side: `CrashServer` drives the
server, `Campaign` runs trials and checks what a killed worker left.
`tests/test_crash.py` and `benchmarks/crash_trials.py` both use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small enough that the state.bin of a checkpoint (about 6 MiB) goes up as an
# S3 multipart or GCS resumable upload, so kills land inside one.
BLOCK_SIZE = 5 * 2**20
# A worker that is not killed exits by itself after this long, so no process
# outlives a parent that died.
WORKER_SECONDS = 60.0

# Child side: the fork server and its workers.

_pause_at: tuple[str, int] | None = None
_phase_counts: dict[str, int] = {}


def emit(event: str, **fields: Any) -> None:
    """Write one event line with a single unbuffered write, so a kill never loses a finished line."""
    os.write(1, (json.dumps({"event": event, "time": time.monotonic(), **fields}) + "\n").encode())


def mark(phase: str, path: str = "") -> None:
    """Report the phase a worker enters; stop there if the request asked to pause at it."""
    emit("phase", phase=phase, path=path)
    _phase_counts[phase] = _phase_counts.get(phase, 0) + 1
    if _pause_at is not None and _pause_at == (phase, _phase_counts[phase]):
        emit("paused", phase=phase, path=path)
        time.sleep(WORKER_SECONDS)
        os._exit(3)


class _CountingWriter:
    """A write handle that reports when more than one block of a file has been written."""

    def __init__(self, handle: Any, path: str):
        self._handle = handle
        self._path = path
        self._written = 0

    def write(self, data: bytes) -> int:
        written = self._handle.write(data)
        before, self._written = self._written, self._written + len(data)
        if before < BLOCK_SIZE <= self._written:
            # fsspec uploads a full block inside write(), so on S3 and GCS one
            # part is stored and the upload is not yet complete.
            mark("payload-part", self._path)
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def instrument(backend_class: type) -> None:
    """Wrap the writing and deleting methods of a backend class so each reports its phase."""
    from statefs.commit import CLAIM_NAME
    from statefs.manifest import MANIFEST_NAME

    create_exclusive = backend_class.create_exclusive
    open_write = backend_class.open_write
    delete = backend_class.delete
    delete_tree = backend_class.delete_tree

    def create_exclusive_marked(self, path: str, data: bytes) -> None:
        name = path.rsplit("/", 1)[-1]
        phase = {CLAIM_NAME: "claim", MANIFEST_NAME: "manifest"}.get(name, "create")
        mark(phase, path)
        create_exclusive(self, path, data)
        if phase == "manifest":
            mark("committed", path)

    @contextlib.contextmanager
    def open_write_marked(self, path: str) -> Iterator[Any]:
        mark("payload", path)
        with open_write(self, path) as handle:
            yield _CountingWriter(handle, path)
        mark("payload-done", path)

    def delete_marked(self, path: str) -> None:
        # Only rotation deletes a manifest on its own: delete_unit removes it
        # first so the unit stops counting, then removes the tree.
        rotating = path.rsplit("/", 1)[-1] == MANIFEST_NAME
        if rotating:
            mark("rotate", path)
        delete(self, path)
        if rotating:
            mark("rotate-tree", path)

    def delete_tree_marked(self, path: str) -> None:
        mark("delete-tree", path)
        delete_tree(self, path)

    backend_class.create_exclusive = create_exclusive_marked
    backend_class.open_write = open_write_marked
    backend_class.delete = delete_marked
    backend_class.delete_tree = delete_tree_marked


class PreparedVariable:
    """A stand-in for a Keras variable, holding a NumPy array.

    Its `value` offers `read_value()`, as a TensorFlow variable's value does,
    so statefs captures it without importing Keras or TensorFlow.
    """

    def __init__(self, path: str, array: Any):
        self.path = path
        self.array = array
        self.dtype = array.dtype.name
        self.shape = array.shape

    @property
    def value(self) -> PreparedVariable:
        return self

    def read_value(self) -> Any:
        return self.array


class PreparedOptimizer:
    built = True

    def __init__(self, variables: list[PreparedVariable]):
        self.variables = variables


class PreparedModel:
    """A stand-in for a trained Keras model.

    Its variables come from the parent's arrays, and `save` copies a prepared `.keras` file.
    """

    def __init__(self, files: dict[str, str]):
        import numpy as np

        self.files = files
        groups: dict[str, list[PreparedVariable]] = {"model": [], "optimizer": [], "metrics": []}
        with np.load(files["variables"]) as arrays:
            # Keys are "<group>.<index>" with a zero-padded index, so sorting restores the order.
            for key in sorted(arrays.files):
                group = key.split(".", 1)[0]
                groups[group].append(PreparedVariable(key, arrays[key]))
        self.variables = groups["model"]
        self.optimizer = PreparedOptimizer(groups["optimizer"])
        self.metrics_variables = groups["metrics"]

    def save(self, path: str) -> None:
        shutil.copyfile(self.files["keras"], path)


def run_checkpoints(request: dict[str, Any], model: PreparedModel, more: Callable[[], bool]) -> None:
    from statefs.checkpoints import CheckpointManager

    manager = CheckpointManager(request["url"], max_to_keep=request["max_to_keep"], storage_options=request["storage_options"])
    while more():
        latest = manager.latest()
        step = 0 if latest is None else latest.step + 1
        manager.save(model, step=step, epoch=step)
        emit("done", number=step)


def run_publishes(request: dict[str, Any], model: PreparedModel, more: Callable[[], bool]) -> None:
    from statefs import keras_io
    from statefs.versions import VersionRegistry

    def copy_saved_model(_model: Any, folder: str) -> None:
        shutil.copytree(model.files["saved_model"], folder)

    keras_io.export_saved_model = copy_saved_model
    registry = VersionRegistry(request["url"], storage_options=request["storage_options"])
    while more():
        emit("done", number=registry.publish(model, metadata={"worker": os.getpid()}))


def run_migrations(request: dict[str, Any], model: PreparedModel, more: Callable[[], bool]) -> None:
    from statefs import backends
    from statefs.commit import list_children, remove_fragment
    from statefs.errors import UnitExistsError
    from statefs.migration import migrate

    options = request["storage_options"]
    number = request["start"]
    while more():
        destination = f"{request['url']}/copy-{number}"
        try:
            migrate(request["source"], destination, src_storage_options=options, dst_storage_options=options)
        except UnitExistsError as error:
            if "unfinished write" not in str(error):
                raise
            # The remedy the message gives: no writer runs there, so remove
            # the fragments and run the same migration again.
            emit("rejected", number=number, message=str(error))
            backend, path = backends.resolve(destination, options)
            for child in list_children(backend, path).values():
                remove_fragment(backend, child)
            migrate(request["source"], destination, src_storage_options=options, dst_storage_options=options)
        emit("done", number=number)
        number += 1


OPERATIONS = {"checkpoint": run_checkpoints, "version": run_publishes, "migrate": run_migrations}


def run_worker(request: dict[str, Any]) -> None:
    """Run one request's operation until killed, `count` operations are done, or time runs out."""
    global _pause_at
    if request.get("pause_at"):
        _pause_at = (request["pause_at"], request.get("pause_occurrence", 1))
    emit("started", pid=os.getpid())
    deadline = time.monotonic() + WORKER_SECONDS
    limit = request.get("count")
    started_operations = 0

    def more() -> bool:
        nonlocal started_operations
        if limit is not None and started_operations >= limit:
            return False
        started_operations += 1
        return time.monotonic() < deadline

    try:
        OPERATIONS[request["operation"]](request, PreparedModel(request["files"]), more)
    except BaseException as error:
        emit("error", type=type(error).__name__, message=str(error))
        os._exit(1)
    os._exit(0)


def serve() -> None:
    """Fork one worker per request line on stdin, reap it, and report its exit code."""
    import gcsfs  # noqa: F401
    import s3fs  # noqa: F401

    import statefs.checkpoints  # noqa: F401
    import statefs.migration  # noqa: F401
    import statefs.training_state
    import statefs.versions  # noqa: F401
    from statefs.backends import GCSBackend, LocalBackend, S3Backend

    for backend_class in (LocalBackend, S3Backend, GCSBackend):
        instrument(backend_class)
    emit("ready", pid=os.getpid())
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        pid = os.fork()
        if pid == 0:
            run_worker(request)
        _, status = os.waitpid(pid, 0)
        emit("ended", pid=pid, code=os.waitstatus_to_exitcode(status))


# Parent side: driving the server and checking what workers leave.

PHASES = (
    "startup",
    "claim",
    "payload",
    "payload-part",
    "before-manifest",
    "manifest",
    "after-commit",
    "rotation",
    "fragment-removal",
    "between-operations",
)


def kill_phase(events: list[dict[str, Any]]) -> str:
    """Name the protocol step a worker was in when it died, from its last events."""
    steps = [event for event in events if event["event"] in ("phase", "done", "rejected")]
    if events and events[-1]["event"] == "paused" and events[-1]["phase"] == "manifest":
        # A pause at "manifest" stops before the manifest is sent: the exact
        # point between payload and commit.
        return "before-manifest"
    if not steps:
        return "startup"
    last = steps[-1]
    if last["event"] == "done":
        return "between-operations"
    if last["event"] == "rejected":
        return "fragment-removal"
    if last["phase"] == "delete-tree":
        previous = steps[-2] if len(steps) >= 2 else {}
        return "rotation" if previous.get("phase") == "rotate-tree" else "fragment-removal"
    return _PHASE_BUCKETS.get(last["phase"], "startup")


_PHASE_BUCKETS = {
    "claim": "claim",
    "payload": "payload",
    # Between two payload files; the manifest marker follows the last one.
    "payload-done": "payload",
    "payload-part": "payload-part",
    "manifest": "manifest",
    "committed": "after-commit",
    "rotate": "rotation",
    "rotate-tree": "rotation",
}


class CrashServer:
    """A running fork server, its event stream, and the workers it started.

    Every worker is killed and reaped by the server before `close` returns,
    and the server itself is stopped, killed if it does not stop in time.
    """

    def __init__(self, env: dict[str, str], log_path: str):
        self._log = open(log_path, "ab")
        self.log_path = log_path
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **env},
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._running_worker: int | None = None
        self.next_event(timeout=120, expect="ready")

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                self._events.put({"event": "output", "text": line.decode(errors="replace")})
        self._events.put(None)

    def next_event(self, timeout: float, expect: str | None = None) -> dict[str, Any] | None:
        """Return the next event, or None on timeout; raise if the server has exited."""
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is None:
            raise RuntimeError(f"The crash server exited; its stderr is in {self.log_path}:\n{self.stderr_tail()}")
        if expect is not None and event["event"] != expect:
            raise RuntimeError(f"Expected a {expect!r} event from the crash server. Received: {event}")
        return event

    def start(self, request: dict[str, Any]) -> int:
        """Fork a worker for `request` and return its process id."""
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        self._process.stdin.flush()
        pid = self.next_event(timeout=30, expect="started")["pid"]
        self._running_worker = pid
        return pid

    def kill(self, pid: int) -> None:
        """SIGKILL a running worker; the server reaps it and reports `ended`."""
        if pid == self._running_worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def worker_ended(self, event: dict[str, Any]) -> None:
        if event["event"] == "ended" and event["pid"] == self._running_worker:
            self._running_worker = None

    def stderr_tail(self, size: int = 3000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as log:
            return log.read()[-size:].decode(errors="replace")

    def close(self) -> None:
        if self._running_worker is not None:
            self.kill(self._running_worker)
        with contextlib.suppress(BrokenPipeError, OSError):
            self._process.stdin.write(b'{"quit": true}\n')
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)
        self._log.close()


@dataclasses.dataclass
class Trial:
    """What one worker did before it died, and how it was stopped."""

    number: int
    operation: str
    mode: str
    phase: str
    events: list[dict[str, Any]]
    exit_code: int | None
    seconds: float

    @property
    def killed(self) -> bool:
        return self.exit_code == -signal.SIGKILL

    def done(self) -> list[int]:
        return [event["number"] for event in self.events if event["event"] == "done"]

    def errors(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == "error"]

    def describe(self) -> str:
        tail = [_short(event) for event in self.events[-6:]]
        return f"trial {self.number} ({self.operation}, {self.mode}, killed in {self.phase}, exit {self.exit_code}): {tail}"


def _short(event: dict[str, Any]) -> str:
    fields = {key: value for key, value in event.items() if key not in ("event", "time")}
    if "path" in fields:
        fields["path"] = fields["path"].rsplit("/", 2)[-2:]
    return f"{event['event']} {fields}"


def run_trial(server: CrashServer, request: dict[str, Any], *, delay: float | None, number: int) -> Trial:
    """Start a worker and SIGKILL it after `delay` seconds, or once it reports `paused`.

    With neither a delay nor a pause point the worker runs until it exits.
    """
    started = time.monotonic()
    pid = server.start(request)
    events: list[dict[str, Any]] = []
    kill_at = None if delay is None else started + delay
    exit_code = None
    while exit_code is None:
        timeout = 90.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
        event = server.next_event(timeout=timeout)
        if event is None:
            if kill_at is None:
                raise TimeoutError(f"Timed out after 90 s waiting for worker {pid} to pause or end; last events: {events[-5:]}")
            server.kill(pid)
            kill_at = None
            continue
        if event["event"] == "ended":
            server.worker_ended(event)
            exit_code = event["code"]
            continue
        events.append(event)
        if event["event"] == "paused":
            server.kill(pid)
    if request.get("pause_at"):
        mode = f"pause at {request['pause_at']}"
    elif delay is None:
        mode = "run to end"
    else:
        mode = "random delay"
    return Trial(number, request["operation"], mode, kill_phase(events), events, exit_code, time.monotonic() - started)


# Parent side: preparing payloads, choosing kills, checking what survives.


@dataclasses.dataclass
class Target:
    """An empty root on one backend, and how a child process reaches it."""

    backend: str
    root: str
    storage_options: dict[str, Any] | None
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def write_options(self) -> dict[str, Any] | None:
        """Return storage options with a 5 MiB block size, so large files go up in parts."""
        if self.backend == "s3":
            return {**self.storage_options, "default_block_size": BLOCK_SIZE}
        if self.backend == "gs":
            return {**self.storage_options, "block_size": BLOCK_SIZE}
        return self.storage_options


def wide_model() -> Any:
    """Return a compiled model whose state with Adam slots is about 6 MiB, more than one block."""
    import keras

    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(7000, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def small_model() -> Any:
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@dataclasses.dataclass
class Prepared:
    """Files that workers use instead of serializing a model, and the models they came from."""

    files: dict[str, str]
    wide: Any
    small: Any
    inputs: Any


def variable_arrays(model: Any) -> dict[str, Any]:
    """Return the values of the model's, its optimizer's and its metrics' variables, keyed in order."""
    groups = {"model": model.variables, "optimizer": model.optimizer.variables, "metrics": model.metrics_variables}
    arrays = {}
    for group, variables in groups.items():
        for index, variable in enumerate(variables):
            arrays[f"{group}.{index:05d}"] = variable.numpy()
    return arrays


def prepare_files(folder: str) -> Prepared:
    """Train both models one step and write the files that the stand-in models use."""
    import numpy as np

    from statefs import keras_io

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    inputs = rng.random((32, 64), dtype="float32")
    labels = rng.integers(0, 10, 32)
    wide, small = wide_model(), small_model()
    for model in (wide, small):
        model.fit(inputs, labels, epochs=1, batch_size=32, verbose=0)
    files = {
        "variables": os.path.join(folder, "variables.npz"),
        "saved_model": os.path.join(folder, "saved_model"),
        "keras": os.path.join(folder, keras_io.KERAS_FILE),
    }
    np.savez(files["variables"], **variable_arrays(wide))
    keras_io.export_saved_model(small, files["saved_model"])
    small.save(files["keras"])
    return Prepared(files, wide, small, inputs)


class CrashFailure(AssertionError):
    """A killed worker left a state that breaks the commit protocol's promises."""


@dataclasses.dataclass
class KillPlan:
    """Pause points as (phase, occurrence, share of trials); the other trials kill after a random delay.

    The first trials of a campaign take the pause points in order, so every
    one is hit once whatever the seed.
    """

    pauses: list[tuple[str, int, float]]
    max_delay: float


KILL_PLANS = {
    "checkpoint": KillPlan(
        [("manifest", 1, 0.15), ("rotate-tree", 1, 0.15), ("payload-part", 1, 0.1), ("committed", 1, 0.05), ("delete-tree", 1, 0.05)],
        max_delay=0.8,
    ),
    # The SavedModel folder has several files, so its third upload is mid-payload.
    "version": KillPlan([("manifest", 1, 0.25), ("payload", 3, 0.15)], max_delay=0.6),
    "migrate": KillPlan([("manifest", 2, 0.25), ("payload", 3, 0.15)], max_delay=0.8),
}


def choose_kill(plan: KillPlan, rng: random.Random, index: int) -> tuple[tuple[str, int] | None, float | None]:
    """Return (pause point, None) or (None, delay in seconds) for trial number `index`."""
    if index < len(plan.pauses):
        return plan.pauses[index][:2], None
    choice = rng.random()
    for phase, occurrence, share in plan.pauses:
        if choice < share:
            return (phase, occurrence), None
        choice -= share
    return None, rng.uniform(0.0, plan.max_delay)


class Campaign:
    """Crash trials of one operation on one root, and the checks after each.

    Each trial starts a worker on the root that earlier workers left, and
    kills it at a random moment or at a named pause point. Then the root is
    checked through a separate filesystem instance. Only committed units may
    be listed, and each must match its manifest. The latest must be at least
    as new as every operation a worker reported done, and no worker may fail
    on what an earlier one left.
    """

    def __init__(self, operation: str, target: Target, server: CrashServer, prepared: Prepared, *, seed: int, max_to_keep: int = 2):
        self.operation = operation
        self.target = target
        self.server = server
        self.prepared = prepared
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_to_keep = max_to_keep
        self.url = target.url(operation)
        self.trials: list[Trial] = []
        # Step, version or copy numbers of the operations that workers finished.
        self.completed: list[int] = []
        # Units already checked against their manifests, and manifests already read.
        self.verified: set[str] = set()
        self.known: dict[str, Any] = {}
        self._checker_backend = None
        self.next_copy = 0
        if operation == "migrate":
            self._publish_source()

    def _publish_source(self) -> None:
        """Publish the two committed versions that every migration copies."""
        request = self._request(url=self.target.url("migrate-source"), operation="version", count=2)
        trial = run_trial(self.server, request, delay=None, number=-1)
        if trial.exit_code != 0 or trial.done() != [1, 2]:
            raise CrashFailure(f"Publishing the migration source failed: {trial.describe()}\n{self.server.stderr_tail()}")

    def _request(self, **fields: Any) -> dict[str, Any]:
        request = {
            "operation": self.operation,
            "url": self.url,
            "storage_options": self.target.write_options(),
            "files": self.prepared.files,
            "max_to_keep": self.max_to_keep,
            "source": self.target.url("migrate-source"),
            "start": self.next_copy,
        }
        request.update(fields)
        return request

    def run(self, trials: int) -> list[Trial]:
        for _ in range(trials):
            self.run_one()
        return self.trials

    def run_one(self) -> Trial:
        pause, delay = choose_kill(KILL_PLANS[self.operation], self.rng, len(self.trials))
        request = self._request()
        if pause is not None:
            request.update(pause_at=pause[0], pause_occurrence=pause[1])
        try:
            trial = run_trial(self.server, request, delay=delay, number=len(self.trials))
        except TimeoutError as error:
            raise CrashFailure(f"{self.target.backend} {self.operation}: {error} (seed={self.seed})") from None
        self.trials.append(trial)
        self.check(trial)
        return trial

    def finish(self) -> Trial:
        """Run one operation to its end after the last kill; it must succeed."""
        trial = run_trial(self.server, self._request(count=1), delay=None, number=len(self.trials))
        self.trials.append(trial)
        if trial.exit_code != 0 or len(trial.done()) != 1:
            self.fail(trial, "the operation after the last kill did not complete")
        self.check(trial)
        return trial

    def fail(self, trial: Trial, message: str) -> None:
        raise CrashFailure(
            f"{self.target.backend} {self.operation}: {message}.\n{trial.describe()}\n"
            f"Reproduce with seed={self.seed}; worker stderr:\n{self.server.stderr_tail()}"
        )

    def check(self, trial: Trial) -> None:
        if trial.errors():
            self.fail(trial, f"the worker raised {trial.errors()[0]}")
        if trial.mode != "run to end" and not trial.killed:
            self.fail(trial, "the worker was not killed")
        self.completed.extend(trial.done())
        {"checkpoint": self._check_checkpoints, "version": self._check_versions, "migrate": self._check_copies}[
            self.operation
        ](trial)

    def _units(self, url: str, pattern: str, *, append_only: bool = False) -> tuple[Any, dict[str, str], dict[str, Any]]:
        """List the children of `url` named like `pattern`, and read their manifests.

        Returns the backend, {name: path} of those children, and {name: manifest}
        of the committed ones. The backend sits on its own filesystem
        instance, which drops its listing cache before every listing. Under
        a root where nothing is ever deleted (`append_only`), a manifest
        read once is not read again.
        """
        import re

        from statefs.commit import list_children, read_manifest

        backend, root = self._checker(url)
        children = {name: path for name, path in list_children(backend, root).items() if re.fullmatch(pattern, name)}
        committed = {}
        for name, path in children.items():
            manifest = self.known.get(path) if append_only else None
            if manifest is None:
                manifest = read_manifest(backend, path)
            if manifest is not None:
                committed[name] = self.known[path] = manifest
        return backend, children, committed

    def _checker(self, url: str) -> tuple[Any, str]:
        """Return a backend that shares no filesystem instance with the code under test, and the path of `url`."""
        import fsspec

        from statefs import backends

        if self._checker_backend is None:
            fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(self.target.storage_options or {}))
            self._checker_backend = backends.backend_class(fs.protocol)(fs)
        return self._checker_backend, self._checker_backend.fs._strip_protocol(url)

    def _verify(self, trial: Trial, backend: Any, path: str, manifest: Any) -> None:
        from statefs.commit import verify_unit

        key = f"{path}@{manifest.created}"
        if key in self.verified:
            return
        problems = verify_unit(backend, path, manifest)
        if problems:
            self.fail(trial, f"committed unit {backend.url(path)} does not match its manifest: {problems}")
        self.verified.add(key)

    def _check_checkpoints(self, trial: Trial) -> None:
        from statefs.checkpoints import CheckpointManager

        manager = CheckpointManager(self.url, max_to_keep=self.max_to_keep, storage_options=self.target.storage_options)
        listed = [checkpoint.step for checkpoint in manager.list()]
        backend, children, committed = self._units(self.url, r"ckpt-\d+")
        if sorted(int(name[5:]) for name in committed) != listed:
            self.fail(trial, f"list() returned steps {listed}, but the committed folders are {sorted(committed)}")
        for name, manifest in committed.items():
            self._verify(trial, backend, children[name], manifest)
        latest = manager.latest()
        if self.completed and (latest is None or latest.step < max(self.completed)):
            self.fail(trial, f"latest() is {latest}, older than step {max(self.completed)} that a save returned")
        if listed and latest.step != listed[-1]:
            self.fail(trial, f"latest() is step {latest.step}, not the highest listed step {listed[-1]}")
        if trial.mode == "run to end" and len(listed) != self.max_to_keep:
            self.fail(trial, f"after a completed save, {len(listed)} checkpoints are kept instead of {self.max_to_keep}")

    def _check_versions(self, trial: Trial) -> None:
        from statefs.versions import VersionRegistry

        listed = VersionRegistry(self.url, storage_options=self.target.storage_options).list()
        backend, children, committed = self._units(self.url, r"\d+", append_only=True)
        if sorted(int(name) for name in committed) != listed:
            self.fail(trial, f"list() returned versions {listed}, but the committed folders are {sorted(committed)}")
        if len(set(self.completed)) != len(self.completed):
            self.fail(trial, f"two publishes returned the same number: {self.completed}")
        if not set(self.completed) <= set(listed):
            self.fail(trial, f"published versions {sorted(set(self.completed) - set(listed))} are not listed")
        for name, manifest in committed.items():
            if "saved_model.pb" not in manifest.files:
                self.fail(trial, f"version {name} is committed without saved_model.pb")
            self._verify(trial, backend, children[name], manifest)

    def _check_copies(self, trial: Trial) -> None:
        rejected = [event["number"] for event in trial.events if event["event"] == "rejected"]
        if any(number != self.next_copy for number in rejected):
            self.fail(trial, f"a migration was rejected at copies {rejected}, but only copy-{self.next_copy} was interrupted")
        _, _, source = self._units(self.target.url("migrate-source"), r"\d+", append_only=True)
        # Copies before this trial's first one were checked when they completed.
        touched = range(self.next_copy, max(trial.done(), default=self.next_copy) + 2)
        for number in touched:
            copy_url = f"{self.url}/copy-{number}"
            backend, children, versions = self._units(copy_url, r"\d+", append_only=True)
            for name, manifest in versions.items():
                if manifest.files != source[name].files:
                    self.fail(trial, f"copy-{number}/{name} is committed with files that differ from the source")
                self._verify(trial, backend, children[name], manifest)
            if number in trial.done() and sorted(versions) != sorted(source):
                self.fail(trial, f"copy-{number} was reported migrated but holds versions {sorted(versions)}")
        if trial.done():
            self.next_copy = max(trial.done()) + 1

    def leftovers(self) -> int:
        """Count the folders without a manifest that killed workers left under this root."""
        if self.operation != "migrate":
            _, children, committed = self._units(self.url, r"ckpt-\d+" if self.operation == "checkpoint" else r"\d+")
            return len(children) - len(committed)
        count = 0
        for name in self._units(self.url, r"copy-\d+")[1]:
            _, children, committed = self._units(f"{self.url}/{name}", r"\d+", append_only=True)
            count += len(children) - len(committed)
        return count

    def check_survivor(self) -> None:
        """Load what the last operation committed with Keras and compare it with the prepared model."""
        import numpy as np

        from statefs.checkpoints import CheckpointManager
        from statefs.versions import VersionRegistry

        options = self.target.storage_options
        if self.operation == "checkpoint":
            restored = wide_model()
            CheckpointManager(self.url, storage_options=options).restore(restored)
            expected, found = self.prepared.wide.get_weights(), restored.get_weights()
        else:
            root = self.url if self.operation == "version" else f"{self.url}/copy-{max(self.completed)}"
            loaded = VersionRegistry(root, storage_options=options).load()
            expected = [self.prepared.small.predict(self.prepared.inputs, verbose=0)]
            found = [loaded.predict(self.prepared.inputs, verbose=0)]
        if not all(np.array_equal(a, b) for a, b in zip(expected, found, strict=True)):
            raise CrashFailure(f"{self.target.backend} {self.operation}: the state loaded back differs (seed={self.seed})")


def phase_counts(trials: list[Trial]) -> dict[str, int]:
    counts = {phase: 0 for phase in PHASES}
    for trial in trials:
        if trial.killed:
            counts[trial.phase] = counts.get(trial.phase, 0) + 1
    return counts


if __name__ == "__main__":
    serve()
