"""Compare-and-swap of a small object, on every backend.

`read_versioned` returns an object's content and a version token, and
`compare_and_swap` replaces the object only if it is still at that token.
Each contract test runs once per backend through the `store` fixture, and
checks what is stored through `store.fs()`, a filesystem instance that shares
no cache with the backend under test. gcp-storage-emulator does not enforce
generation preconditions, so for gs the tests show that the precondition is
sent and skip the tests that need the server to reject a write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import make_store
from statefs import backends
from statefs.backends import BackendCapabilityWarning, GenericBackend
from statefs.errors import ConcurrentUpdateError

GCS_EMULATOR_REASON = (
    "gcp-storage-emulator accepts ifGenerationMatch but does not enforce it, so a write with a "
    "stale generation overwrites the object; real GCS rejects it with 412 Precondition Failed. "
    "test_gcs_swap_sends_generation_precondition shows that the precondition is sent."
)

THREADS = 4
INCREMENTS_PER_THREAD = 10
PROCESSES = 2
INCREMENTS_PER_PROCESS = 25
# Enough for every increment to lose to each of the other writers many
# times over; reaching it means that swaps do not make progress.
MAX_ATTEMPTS_PER_INCREMENT = 500
PAUSE_BETWEEN_READ_AND_SWAP = 0.001  # seconds


def resolve(store, *parts, fresh_instance=False):
    options = dict(store.storage_options or {})
    if fresh_instance:
        options["skip_instance_cache"] = True
    return backends.resolve(store.url(*parts), options)


def skip_if_emulator_ignores_preconditions(store) -> None:
    if store.backend == "gs":
        pytest.skip(GCS_EMULATOR_REASON)


def stored_bytes(store, *parts) -> bytes:
    return store.fs().cat_file(store.path(*parts))


def increment_counter(backend, path: str) -> int:
    """Add one to the JSON counter at `path`, retrying on conflicts, and return the number of conflicts."""
    for conflicts in range(MAX_ATTEMPTS_PER_INCREMENT):
        data, token = backend.read_versioned(path)
        counter = json.loads(data)
        counter["value"] += 1
        # Without a pause between read and swap, the GIL often runs a whole
        # increment on `memory://` before another thread starts one, and
        # the writers would not race.
        time.sleep(PAUSE_BETWEEN_READ_AND_SWAP)
        try:
            backend.compare_and_swap(path, json.dumps(counter).encode(), token)
        except ConcurrentUpdateError:
            continue
        return conflicts
    raise AssertionError(f"no swap of {path} succeeded in {MAX_ATTEMPTS_PER_INCREMENT} attempts")


# The contract, on every backend.


def test_swap_with_none_creates_object(store):
    backend, path = resolve(store, "aliases.json")

    token = backend.compare_and_swap(path, b"first", None)

    assert stored_bytes(store, "aliases.json") == b"first"
    assert backend.read_versioned(path) == (b"first", token)


def test_swap_with_current_token_replaces_object(store):
    backend, path = resolve(store, "aliases.json")
    backend.compare_and_swap(path, b"first", None)
    _, token = backend.read_versioned(path)

    new_token = backend.compare_and_swap(path, b"second", token)

    assert stored_bytes(store, "aliases.json") == b"second"
    assert backend.read_versioned(path) == (b"second", new_token)


def test_stale_token_keeps_other_writers_content(store):
    skip_if_emulator_ignores_preconditions(store)
    writer, path = resolve(store, "aliases.json")
    other_writer, _ = resolve(store, "aliases.json", fresh_instance=True)
    writer.compare_and_swap(path, b"first", None)
    _, stale_token = writer.read_versioned(path)
    _, token = other_writer.read_versioned(path)
    other_writer.compare_and_swap(path, b"from the other writer", token)

    with pytest.raises(ConcurrentUpdateError):
        writer.compare_and_swap(path, b"lost update", stale_token)
    assert stored_bytes(store, "aliases.json") == b"from the other writer"


def test_conflict_message_names_url_token_and_fix(store):
    skip_if_emulator_ignores_preconditions(store)
    backend, path = resolve(store, "aliases.json")
    stale_token = backend.compare_and_swap(path, b"first", None)
    backend.compare_and_swap(path, b"second", stale_token)

    with pytest.raises(ConcurrentUpdateError) as raised:
        backend.compare_and_swap(path, b"third", stale_token)

    message = str(raised.value)
    assert backend.url(path) in message
    assert repr(stale_token) in message
    assert "another writer" in message
    assert "read_versioned()" in message
    assert "retry" in message
    assert raised.value.expected == stale_token
    assert isinstance(raised.value, FileExistsError)


def test_swap_with_none_rejects_existing_object(store):
    skip_if_emulator_ignores_preconditions(store)
    backend, path = resolve(store, "aliases.json")
    backend.write_bytes(path, b"already there")

    with pytest.raises(ConcurrentUpdateError, match="expected no object"):
        backend.compare_and_swap(path, b"second", None)
    assert stored_bytes(store, "aliases.json") == b"already there"


def test_swap_with_token_of_deleted_object_raises(store):
    skip_if_emulator_ignores_preconditions(store)
    backend, path = resolve(store, "aliases.json")
    token = backend.compare_and_swap(path, b"first", None)
    store.fs().rm_file(store.path("aliases.json"))

    with pytest.raises(ConcurrentUpdateError):
        backend.compare_and_swap(path, b"second", token)
    assert not store.fs().exists(store.path("aliases.json"))


def test_swap_detects_plain_write(store):
    skip_if_emulator_ignores_preconditions(store)
    backend, path = resolve(store, "aliases.json")
    backend.compare_and_swap(path, b"first", None)
    _, token = backend.read_versioned(path)
    store.fs().pipe_file(store.path("aliases.json"), b"written without a token")

    with pytest.raises(ConcurrentUpdateError):
        backend.compare_and_swap(path, b"lost update", token)
    assert stored_bytes(store, "aliases.json") == b"written without a token"


def test_read_versioned_of_missing_object_raises(store):
    backend, path = resolve(store, "aliases.json")

    with pytest.raises(FileNotFoundError):
        backend.read_versioned(path)


def test_read_versioned_returns_token_of_last_swap(store):
    backend, path = resolve(store, "aliases.json")
    backend.compare_and_swap(path, b"first", None)
    _, token = backend.read_versioned(path)
    new_token = backend.compare_and_swap(path, b"second", token)

    other_backend, _ = resolve(store, "aliases.json", fresh_instance=True)

    assert other_backend.read_versioned(path) == (b"second", new_token)


def test_token_changes_on_every_swap(store):
    backend, path = resolve(store, "aliases.json")
    tokens = [backend.compare_and_swap(path, b"version 0", None)]
    for number in range(1, 4):
        tokens.append(backend.compare_and_swap(path, f"version {number}".encode(), tokens[-1]))

    assert len(set(tokens)) == len(tokens)


@pytest.mark.parametrize("backend_name", ["file", "memory", "gs"])
def test_token_changes_for_same_bytes(backend_name, request, tmp_path):
    store = make_store(backend_name, request, tmp_path)
    backend, path = resolve(store, "aliases.json")
    first = backend.compare_and_swap(path, b"same bytes", None)

    second = backend.compare_and_swap(path, b"same bytes", first)

    assert second != first
    assert backend.read_versioned(path)[1] == second


def test_s3_token_kept_for_same_bytes(request, tmp_path):
    # The ETag of a single-part upload is the MD5 of its content. A swap
    # that then succeeds with an older token acts on the very bytes its
    # writer read, so no update is lost.
    store = make_store("s3", request, tmp_path)
    backend, path = resolve(store, "aliases.json")
    first = backend.compare_and_swap(path, b"same bytes", None)

    second = backend.compare_and_swap(path, b"same bytes", first)

    assert second == first


# Racing writers. Each increment reads, adds one and swaps, and retries on a
# conflict. A lost update shows as a final count below the number of increments.


def test_racing_threads_lose_no_increment(store):
    skip_if_emulator_ignores_preconditions(store)
    setup_backend, path = resolve(store, "counter.json")
    setup_backend.compare_and_swap(path, b'{"value": 0}', None)
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    conflicts: list[int] = []

    def run_writer() -> None:
        backend, _ = resolve(store, "counter.json", fresh_instance=True)
        try:
            start.wait(timeout=30)
            for _ in range(INCREMENTS_PER_THREAD):
                conflicts.append(increment_counter(backend, path))
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=run_writer) for _ in range(THREADS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)

    assert not any(writer.is_alive() for writer in writers)
    assert errors == []
    assert sum(conflicts) > 0, "the writers never raced, so the test showed nothing"
    assert json.loads(stored_bytes(store, "counter.json")) == {"value": THREADS * INCREMENTS_PER_THREAD}


PROCESS_WRITER = """
import json, os, sys, time
from statefs import backends
from statefs.errors import ConcurrentUpdateError

url, ready_folder, writers, increments, max_attempts, pause, writer_id = sys.argv[1:]
backend, path = backends.resolve(url)

# Start together, so that the two writers overlap.
open(os.path.join(ready_folder, writer_id), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir(ready_folder)) < int(writers):
    if time.monotonic() > deadline:
        sys.exit("the other writer did not start within 60 s")
    time.sleep(0.01)

conflicts = 0
for _ in range(int(increments)):
    for attempt in range(int(max_attempts)):
        data, token = backend.read_versioned(path)
        counter = json.loads(data)
        counter["value"] += 1
        time.sleep(float(pause))
        try:
            backend.compare_and_swap(path, json.dumps(counter).encode(), token)
            break
        except ConcurrentUpdateError:
            conflicts += 1
    else:
        sys.exit(f"no swap succeeded in {max_attempts} attempts")
print(conflicts)
"""


def test_local_racing_processes_lose_no_increment(tmp_path):
    url = str(tmp_path / "store" / "counter.json")
    backend, path = backends.resolve(url)
    backend.compare_and_swap(path, b'{"value": 0}', None)
    ready_folder = tmp_path / "ready"
    ready_folder.mkdir()
    arguments = [
        url,
        str(ready_folder),
        str(PROCESSES),
        str(INCREMENTS_PER_PROCESS),
        str(MAX_ATTEMPTS_PER_INCREMENT),
        str(PAUSE_BETWEEN_READ_AND_SWAP),
    ]

    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROCESS_WRITER), *arguments, str(writer_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for writer_id in range(PROCESSES)
    ]
    outputs = []
    try:
        for writer in writers:
            outputs.append(writer.communicate(timeout=120))
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()

    for writer, (_, stderr) in zip(writers, outputs):
        assert writer.returncode == 0, f"writer process failed:\n{stderr[-4000:]}"
    conflicts = sum(int(stdout) for stdout, _ in outputs)
    assert conflicts > 0, "the writers never raced, so the test showed nothing"
    final = json.loads(backend.read_versioned(path)[0])
    assert final == {"value": PROCESSES * INCREMENTS_PER_PROCESS}


# Local disk: the lock file.


def test_local_swap_keeps_lock_file_beside_object(tmp_path):
    backend, path = backends.resolve(str(tmp_path / "aliases.json"))

    backend.compare_and_swap(path, b"first", None)

    assert sorted(os.listdir(tmp_path)) == [".aliases.json.lock", "aliases.json"]


def test_local_swap_survives_removed_lock_file(tmp_path):
    backend, path = backends.resolve(str(tmp_path / "aliases.json"))
    token = backend.compare_and_swap(path, b"first", None)
    os.remove(tmp_path / ".aliases.json.lock")
    _, token_without_lock_file = backend.read_versioned(path)

    new_token = backend.compare_and_swap(path, b"second", token_without_lock_file)

    assert token_without_lock_file != token
    assert backend.read_versioned(path) == (b"second", new_token)


# GCS: the emulator does not enforce preconditions, so these tests show that
# the backend sends them.


@pytest.fixture
def gcs_store(request, tmp_path):
    return make_store("gs", request, tmp_path)


def record_gcs_uploads(fs, monkeypatch) -> list[dict]:
    """Record the keyword arguments of every POST request the gcsfs instance sends."""
    uploads: list[dict] = []
    send = fs._call

    async def recording_call(method, path, *args, **kwargs):
        if method == "POST":
            uploads.append(kwargs)
        return await send(method, path, *args, **kwargs)

    monkeypatch.setattr(fs, "_call", recording_call)
    return uploads


def test_gcs_swap_sends_generation_precondition(gcs_store, monkeypatch):
    backend, path = resolve(gcs_store, "aliases.json")
    backend.compare_and_swap(path, b"first", None)
    _, generation = backend.read_versioned(path)
    uploads = record_gcs_uploads(backend.fs, monkeypatch)

    backend.compare_and_swap(path, b"second", generation)

    assert len(uploads) == 1
    assert uploads[0].get("ifGenerationMatch") == generation


def test_gcs_swap_with_none_sends_generation_zero(gcs_store, monkeypatch):
    backend, path = resolve(gcs_store, "aliases.json")
    uploads = record_gcs_uploads(backend.fs, monkeypatch)

    backend.compare_and_swap(path, b"first", None)

    assert len(uploads) == 1
    assert uploads[0].get("ifGenerationMatch") == "0"


def test_gcs_token_is_object_generation(gcs_store):
    backend, path = resolve(gcs_store, "aliases.json")

    token = backend.compare_and_swap(path, b"first", None)

    assert token == gcs_store.fs().info(gcs_store.path("aliases.json"))["generation"]


# Capability flags and the generic backend.


@pytest.mark.parametrize("backend_name", ["file", "memory", "s3", "gs"])
def test_dedicated_backends_declare_compare_and_swap(backend_name):
    assert backends.backend_class(backend_name).capabilities.compare_and_swap


@pytest.fixture
def generic_backend(monkeypatch):
    """A GenericBackend over a fresh in-memory filesystem registered under its own protocol."""
    protocol = "statefscas"

    class ProtocolMemoryFileSystem(MemoryFileSystem):
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.removeprefix(f"{protocol}://"))

    ProtocolMemoryFileSystem.protocol = protocol
    fsspec.register_implementation(protocol, ProtocolMemoryFileSystem, clobber=True)
    monkeypatch.setattr(backends, "_registry", dict(backends._registry))
    monkeypatch.setattr(GenericBackend, "_warned", set())
    with pytest.warns(BackendCapabilityWarning) as caught:
        backend, path = backends.resolve(f"{protocol}://root/aliases.json")
    return backend, path, str(caught[0].message)


def test_generic_backend_warning_names_compare_and_swap(generic_backend):
    backend, _, warning = generic_backend

    assert not backend.capabilities.compare_and_swap
    assert "compare-and-swap" in warning


def test_generic_swap_rejects_stale_token(generic_backend):
    backend, path, _ = generic_backend
    stale_token = backend.compare_and_swap(path, b"first", None)
    backend.compare_and_swap(path, b"second", stale_token)

    with pytest.raises(ConcurrentUpdateError):
        backend.compare_and_swap(path, b"lost update", stale_token)
    assert backend.read_bytes(path) == b"second"


def test_generic_swap_with_none_rejects_existing_object(generic_backend):
    backend, path, _ = generic_backend
    backend.write_bytes(path, b"already there")

    with pytest.raises(ConcurrentUpdateError):
        backend.compare_and_swap(path, b"second", None)
    assert backend.read_bytes(path) == b"already there"
