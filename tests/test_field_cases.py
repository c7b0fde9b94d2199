"""Failures reported from real deployments, replayed against every backend.

- C09: a checkpoint save dies after its payload is written and before its
  manifest; a new process must resume from the last committed step.
- C10: a reader lists versions while version 3 is being published; it must
  not see version 3 until every file of it is stored.
- C11: a snapshot larger than one multipart block is written in one call.
  Its parts must join into the exact bytes. An upload aborted midway must
  leave no object and keep the previous snapshot.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import crash_child
import statefs
from conftest import build_model, stored_files
from crash_child import CrashServer, run_trial
from statefs import backends
from statefs.checksums import digest_bytes
from statefs.commit import CLAIM_NAME, UnitWriter, read_manifest, remove_fragment, verify_unit
from statefs.manifest import MANIFEST_NAME
from statefs.training_state import INDEX_FILE, STATE_FILE, CapturedState, Position

pytestmark = pytest.mark.slow

BLOCK_SIZE = 5 * 2**20
# The block-size option of each object store's fsspec filesystem.
BLOCK_SIZE_OPTION = {"s3": "default_block_size", "gs": "block_size"}


@pytest.fixture(scope="module")
def trained(digits):
    """A small classifier trained for one epoch; saving does not change it."""
    model = build_model()
    x, y, _, _ = digits
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    return model


def weights_equal(first, second) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


def fresh_backend(store):
    """Return a backend on a new filesystem instance, sharing no cache with the code under test."""
    fs = store.fs()
    return backends.backend_class(fs.protocol)(fs)


# C09: a save that dies between its payload and its manifest.


def checkpoints_for(store) -> statefs.CheckpointManager:
    return statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options)


def leave_fragment(store, step: int, model) -> None:
    """Claim a step and upload its payload without the manifest, as a writer that died there would."""
    backend, path = backends.resolve(store.url("ckpt", f"ckpt-{step}"), store.storage_options)
    writer = UnitWriter(backend, path, kind="checkpoint")
    writer.claim()
    CapturedState(model, Position(step=step)).write(writer)


def failing_commit(self):
    """Stand in for UnitWriter.commit: fail after the payload, as a dropped connection would."""
    raise ConnectionResetError("connection reset before the manifest was written")


def test_failed_commit_keeps_last_checkpoint(store, trained, monkeypatch):
    checkpoints_for(store).save(trained, step=1)
    checkpoints_for(store).save(trained, step=2)
    uploaded = []
    original_put_chunks = UnitWriter.put_chunks

    def put_chunks(self, relative_path, chunks):
        uploaded.append(relative_path)
        return original_put_chunks(self, relative_path, chunks)

    monkeypatch.setattr(UnitWriter, "put_chunks", put_chunks)
    monkeypatch.setattr(UnitWriter, "commit", failing_commit)
    with pytest.raises(ConnectionResetError):
        checkpoints_for(store).save(trained, step=3)

    assert uploaded == [STATE_FILE, INDEX_FILE]
    assert [checkpoint.step for checkpoint in checkpoints_for(store).list()] == [1, 2]
    assert checkpoints_for(store).latest().step == 2
    # The failing writer removed its own payload on the way out.
    assert not any(name.startswith("ckpt-3/") for name in stored_files(store, "ckpt"))


def test_restore_after_failed_commit(store, trained, monkeypatch):
    checkpoints_for(store).save(trained, step=2)

    changed = build_model()
    changed.set_weights([np.zeros_like(weight) for weight in trained.get_weights()])
    with monkeypatch.context() as patch:
        patch.setattr(UnitWriter, "commit", failing_commit)
        with pytest.raises(ConnectionResetError):
            checkpoints_for(store).save(changed, step=3)
    restored = build_model()

    assert checkpoints_for(store).restore(restored).step == 2
    assert weights_equal(restored, trained)


def test_save_after_failed_commit_succeeds(store, trained, monkeypatch):
    checkpoints_for(store).save(trained, step=2)

    with monkeypatch.context() as patch:
        patch.setattr(UnitWriter, "commit", failing_commit)
        with pytest.raises(ConnectionResetError):
            checkpoints_for(store).save(trained, step=3)

    assert checkpoints_for(store).save(trained, step=3).step == 3
    assert checkpoints_for(store).latest().step == 3


def test_fragment_after_payload_is_ignored(store, trained):
    checkpoints_for(store).save(trained, step=2)
    leave_fragment(store, 3, trained)
    manager = checkpoints_for(store)
    restored = build_model()

    assert [checkpoint.step for checkpoint in manager.list()] == [2]
    assert manager.latest().step == 2
    assert manager.restore(restored).step == 2
    assert weights_equal(restored, trained)
    # Reading never deletes: the fragment is still there for gc or the next save.
    assert set(stored_files(store, "ckpt/ckpt-3")) == {CLAIM_NAME, STATE_FILE, INDEX_FILE}


def test_remove_fragment_cleans_dead_save(store, trained):
    checkpoints_for(store).save(trained, step=2)
    leave_fragment(store, 3, trained)
    backend, path = backends.resolve(store.url("ckpt", "ckpt-3"), store.storage_options)

    assert remove_fragment(backend, path) is True
    assert stored_files(store, "ckpt/ckpt-3") == {}
    assert checkpoints_for(store).latest().step == 2


def test_save_replaces_fragment_at_step(store, trained):
    checkpoints_for(store).save(trained, step=2)
    leave_fragment(store, 3, trained)

    checkpoints_for(store).save(trained, step=3)

    backend = fresh_backend(store)
    path = store.path("ckpt", "ckpt-3")
    manifest = read_manifest(backend, path)
    assert manifest is not None
    assert verify_unit(backend, path, manifest) == []
    assert [checkpoint.step for checkpoint in checkpoints_for(store).list()] == [2, 3]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Files prepared from real Keras models, which a crash worker uses instead of serializing a model."""
    return crash_child.prepare_files(str(tmp_path_factory.mktemp("prepared")))


@pytest.fixture
def crash_server(shared_store, tmp_path):
    """A fork server for workers that reach `shared_store`; stopped, with its workers, after the test."""
    temporary = tmp_path / "worker-tmp"
    temporary.mkdir()
    server = CrashServer({**shared_store.env, "TMPDIR": str(temporary)}, str(tmp_path / "server.log"))
    yield server
    server.close()
    shutil.rmtree(temporary)


def test_killed_save_resumes_from_last_step(shared_store, crash_server, prepared):
    request = {
        "operation": "checkpoint",
        "url": shared_store.url("ckpt"),
        "storage_options": None,
        "files": prepared.files,
        "max_to_keep": 5,
        # Steps 0 and 1 commit; the worker is killed before the manifest of step 2.
        "pause_at": "manifest",
        "pause_occurrence": 3,
    }

    trial = run_trial(crash_server, request, delay=None, number=0)

    assert trial.killed, trial.describe()
    assert trial.phase == "before-manifest"
    assert trial.done() == [0, 1]
    assert set(stored_files(shared_store, "ckpt/ckpt-2")) == {CLAIM_NAME, STATE_FILE, INDEX_FILE}
    manager = checkpoints_for(shared_store)
    assert manager.latest().step == 1
    restored = crash_child.wide_model()
    assert manager.restore(restored).step == 1
    assert weights_equal(restored, prepared.wide)
    assert manager.save(prepared.wide, step=2).step == 2
    assert MANIFEST_NAME in stored_files(shared_store, "ckpt/ckpt-2")
    assert [checkpoint.step for checkpoint in manager.list()] == [0, 1, 2]


# C10: a reader lists versions while version 3 is being published.


def registry_for(store, *, separate_instance: bool = False) -> statefs.VersionRegistry:
    """Return a registry on the store; a separate instance shares no filesystem cache with the writer."""
    options = dict(store.storage_options or {})
    if separate_instance:
        options["skip_instance_cache"] = True
    return statefs.VersionRegistry(store.url("models"), storage_options=options)


NON_NUMERIC_NAMES = ("latest", "3a", "4.0")


@pytest.fixture
def publish_observed(store, trained):
    """Publish versions 1 and 2, add non-numeric committed copies, then publish 3 under observation.

    After each file of version 3 is stored, a reader on its own filesystem
    instance lists the versions and the files of folder 3. The fixture
    returns the observations as (stored file, listed versions, files in
    folder 3), the number that publish returned, and the reader.
    """
    writer = registry_for(store)
    writer.publish(trained)
    writer.publish(trained)
    for name in NON_NUMERIC_NAMES:
        # Each copy is a committed unit, so only its name keeps it from counting.
        statefs.migrate(
            store.url("models", "2"),
            store.url("models", name),
            src_storage_options=store.storage_options,
            dst_storage_options=store.storage_options,
        )
    reader = registry_for(store, separate_instance=True)
    # The files are listed through a third filesystem instance: a listing
    # inside folder 3 by the reader's own instance would leave a stale cache
    # there (see test_reader_sees_commit_after_listing_fragment).
    observer = fresh_backend(store)
    folder = store.path("models", "3")
    observations = []
    original_open_write = writer.backend.open_write
    original_create_exclusive = writer.backend.create_exclusive

    def observe(path: str) -> None:
        observations.append((path.rsplit("/3/", 1)[-1], reader.list(), set(observer.find(folder))))

    @contextlib.contextmanager
    def open_write(path):
        with original_open_write(path) as handle:
            yield handle
        observe(path)

    def create_exclusive(path, data):
        original_create_exclusive(path, data)
        observe(path)

    writer.backend.open_write = open_write
    writer.backend.create_exclusive = create_exclusive
    number = writer.publish(trained)
    return observations, number, reader


def test_version_invisible_until_committed(publish_observed):
    observations, number, reader = publish_observed

    assert number == 3
    before_manifest = [listed for written, listed, _ in observations if written != MANIFEST_NAME]
    assert len(before_manifest) >= 5
    assert all(listed == [1, 2] for listed in before_manifest)
    assert observations[-1][0] == MANIFEST_NAME
    assert observations[-1][1] == [1, 2, 3]
    assert reader.latest() == 3


def test_listed_version_has_every_file(store, publish_observed):
    observations, _, reader = publish_observed
    manifest = reader.manifest(3)

    for written, listed, present in observations:
        if 3 in listed:
            assert set(manifest.files) | {CLAIM_NAME, MANIFEST_NAME} == present
        else:
            assert MANIFEST_NAME not in present, written
    assert verify_unit(fresh_backend(store), store.path("models", "3"), manifest) == []


def test_saved_model_pb_and_manifest_last(publish_observed):
    observations, _, _ = publish_observed
    stored = [written for written, _, _ in observations]

    assert stored[0] == CLAIM_NAME
    assert stored[-2:] == ["saved_model.pb", MANIFEST_NAME]
    assert all("saved_model.pb" not in present for _, _, present in observations[:-2])


def test_non_numeric_names_never_count(store, publish_observed):
    observations, number, reader = publish_observed

    assert number == 3
    assert all(set(listed) <= {1, 2, 3} for _, listed, _ in observations)
    assert reader.list() == [1, 2, 3]
    for name in NON_NUMERIC_NAMES:
        assert read_manifest(fresh_backend(store), store.path("models", name)) is not None
        with pytest.raises(ValueError, match="non-negative integer"):
            reader.load(name)


def test_reader_sees_commit_after_listing_fragment(store, trained, tmp_path):
    writer = registry_for(store)
    writer.publish(trained)
    reader = registry_for(store, separate_instance=True)
    local_file = tmp_path / "model.keras"
    trained.save(str(local_file))
    unit = UnitWriter(writer.backend, writer.backend.join(writer.path, "2"), kind="version")
    unit.claim()
    unit.put_file(str(local_file), "model.keras")
    # A reader that checks what is in folder 2 while the publish runs.
    assert set(reader.backend.find(reader.backend.join(reader.path, "2"))) == {CLAIM_NAME, "model.keras"}

    unit.commit()

    assert reader.list() == [1, 2]


# C11: a snapshot larger than one multipart block, written in one call.


@pytest.fixture(scope="module")
def large_model():
    """A compiled, trained model whose `.weights.h5` with Adam slots is about 12 MiB."""
    import keras

    keras.utils.set_random_seed(13)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(14000, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(3)
    model.fit(rng.random((32, 64), dtype="float32"), rng.integers(0, 10, 32), epochs=1, verbose=0)
    return model


def small_block_options(store) -> dict:
    return {**store.storage_options, BLOCK_SIZE_OPTION[store.backend]: BLOCK_SIZE}


@pytest.fixture
def staged_bytes(monkeypatch):
    """Record the bytes of every local snapshot file that statefs uploads."""
    import statefs.snapshots

    recorded: list[bytes] = []
    original_upload = statefs.snapshots.upload_snapshot

    def upload_snapshot(local_file, backend, path, fmt, **options):
        with open(local_file, "rb") as source:
            recorded.append(source.read())
        return original_upload(local_file, backend, path, fmt, **options)

    monkeypatch.setattr(statefs.snapshots, "upload_snapshot", upload_snapshot)
    return recorded


def s3_part_sizes(store, name: str) -> list[int]:
    """Return the size of each part of a multipart S3 object, as the server reports them."""
    fs = store.fs()
    bucket, key = store.path(name).split("/", 1)
    count = fs.call_s3("head_object", Bucket=bucket, Key=key, PartNumber=1).get("PartsCount", 1)
    return [fs.call_s3("head_object", Bucket=bucket, Key=key, PartNumber=part)["ContentLength"] for part in range(1, count + 1)]


def multipart_etag(data: bytes, part_sizes: list[int]) -> str:
    """Return the ETag S3 gives an object uploaded in these parts: MD5 of the part MD5s, then the count."""
    digests, start = [], 0
    for size in part_sizes:
        digests.append(hashlib.md5(data[start:start + size]).digest())
        start += size
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
def test_large_snapshot_byte_identical(store, large_model, staged_bytes):
    url = store.url("snap", "wide.weights.h5")

    snapshot = statefs.save_snapshot(large_model, url, storage_options=small_block_options(store))

    (local,) = staged_bytes
    assert len(local) > 2 * BLOCK_SIZE
    stored = store.fs().cat_file(store.path("snap", "wide.weights.h5"))
    assert stored == local
    assert digest_bytes(stored).crc32c == snapshot.crc32c == digest_bytes(local).crc32c
    assert snapshot.size == len(local)


@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
def test_large_snapshot_parts_are_valid(store, large_model, staged_bytes):
    statefs.save_snapshot(large_model, store.url("snap", "wide.weights.h5"), storage_options=small_block_options(store))

    (local,) = staged_bytes
    info = store.fs().info(store.path("snap", "wide.weights.h5"))
    assert info["size"] == len(local)
    if store.backend == "s3":
        parts = s3_part_sizes(store, "snap/wide.weights.h5")
        assert len(parts) >= 2
        # S3 rejects a part under 5 MiB unless it is the last one.
        assert all(size >= BLOCK_SIZE for size in parts[:-1])
        assert sum(parts) == len(local)
        assert info["ETag"] == multipart_etag(local, parts)
    else:
        # The emulator computes both checksums over the object it assembled
        # from the resumable upload's chunks.
        assert info["crc32c"] == digest_bytes(local).crc32c
        assert base64.b64decode(info["md5Hash"]) == hashlib.md5(local).digest()


@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
def test_large_snapshot_loads_back(store, large_model):
    url = store.url("snap", "wide.weights.h5")
    statefs.save_snapshot(large_model, url, storage_options=small_block_options(store))
    restored = statefs.load_snapshot(url, model=clone_architecture(large_model), storage_options=store.storage_options)

    assert weights_equal(restored, large_model)


def clone_architecture(model):
    import keras

    clone = keras.models.clone_model(model)
    clone.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return clone


def fail_after_one_block(source, target):
    """Stand in for copy_stream: send a block and a half, then fail as a dropped connection would."""
    target.write(source.read(BLOCK_SIZE + BLOCK_SIZE // 2))
    raise ConnectionResetError("connection reset after 7.5 MiB of the upload")


@pytest.mark.parametrize("store", ["s3"], indirect=True)
@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "new-url"])
def test_aborted_multipart_upload_leaves_no_object(store, large_model, monkeypatch, previous):
    import statefs.snapshots

    url = store.url("snap", "wide.weights.h5")
    if previous:
        statefs.save_snapshot(large_model, url, storage_options=small_block_options(store))
    before = {name: store.fs().cat_file(store.path("snap", name)) for name in stored_files(store, "snap")}
    monkeypatch.setattr(statefs.snapshots, "copy_stream", fail_after_one_block)

    with pytest.raises(ConnectionResetError):
        statefs.save_snapshot(large_model, url, storage_options=small_block_options(store))

    fs = store.fs()
    assert {name: fs.cat_file(store.path("snap", name)) for name in stored_files(store, "snap")} == before
    assert fs.call_s3("list_multipart_uploads", Bucket=store.path().split("/", 1)[0]).get("Uploads", []) == []
    if previous:
        monkeypatch.undo()
        restored = statefs.load_snapshot(url, model=clone_architecture(large_model), storage_options=store.storage_options)
        assert weights_equal(restored, large_model)


ABORTING_UPLOAD = """
    import os, sys
    import statefs.snapshots
    from statefs import backends

    def fail_after_one_block(source, target):
        target.write(source.read({half_block} * 3))
        print("raised", flush=True)
        raise ConnectionResetError("connection reset after 7.5 MiB of the upload")

    statefs.snapshots.copy_stream = fail_after_one_block
    backend, path = backends.resolve({url!r}, {{{option!r}: {block}}})
    statefs.snapshots.upload_snapshot({local_file!r}, backend, path, "weights")
"""


@pytest.mark.parametrize("store", ["gs"], indirect=True)
@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "new-url"])
def test_aborted_resumable_upload_leaves_no_object(store, large_model, tmp_path, previous):
    """An upload that fails after one 5 MiB chunk leaves nothing, even though its cancel fails.

    gcp-storage-emulator returns 501 to the DELETE that cancels a resumable
    upload, and gcsfs retries it for about 30 s. So the upload runs in a
    child process. The test checks the store while the child retries, kills
    the child, and checks again. The unfinished upload never becomes an
    object.
    """
    url = store.url("snap", "wide.weights.h5")
    if previous:
        statefs.save_snapshot(large_model, url, storage_options=small_block_options(store))
    before = {name: store.fs().cat_file(store.path("snap", name)) for name in stored_files(store, "snap")}
    local_file = tmp_path / "wide.weights.h5"
    large_model.save_weights(str(local_file))
    code = ABORTING_UPLOAD.format(
        half_block=BLOCK_SIZE // 2, url=url, option=BLOCK_SIZE_OPTION["gs"], block=BLOCK_SIZE, local_file=str(local_file)
    )
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **store.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "raised"
        during_cancel = {name: store.fs().cat_file(store.path("snap", name)) for name in stored_files(store, "snap")}
    finally:
        child.kill()
        child.wait(timeout=30)

    assert during_cancel == before
    assert {name: store.fs().cat_file(store.path("snap", name)) for name in stored_files(store, "snap")} == before
