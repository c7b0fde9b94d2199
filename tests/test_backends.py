"""The Backend contract on every backend, the backend registry, and endpoints.

Each contract test runs once per backend through the `store` fixture. Checks
that look at the store do so through `store.fs()`, a filesystem instance that
shares no cache with the backend under test.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import textwrap
import time
import warnings

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import statefs
from conftest import BUCKET, make_store
from statefs import backends
from statefs.checksums import digest_bytes
from statefs.backends import Backend, BackendCapabilityWarning, GenericBackend

# Larger than the 5 MiB block size set below, so a streaming write to S3 or
# GCS has started a multipart or resumable upload before it fails.
LARGE_PAYLOAD = b"\x5a" * (12 * 2**20)
SMALL_BLOCK = 5 * 2**20


def resolve(store, *parts, storage_options=None):
    options = store.storage_options if storage_options is None else storage_options
    return backends.resolve(store.url(*parts), options)


def listed_names(store) -> list[str]:
    """Return every file under the root, as a filesystem without statefs's cache lists it."""
    fs = store.fs()
    root = store.path()
    try:
        return sorted(fs.find(root))
    except FileNotFoundError:
        return []


class Boom(Exception):
    """Raised inside a write block to simulate a writer that fails midway."""


# The Backend contract, on every backend.


def test_write_bytes_reads_back(store):
    backend, path = resolve(store, "unit", "data.bin")
    backend.write_bytes(path, b"payload \x00\xff")

    assert backend.read_bytes(path) == b"payload \x00\xff"
    assert store.fs().cat_file(store.path("unit", "data.bin")) == b"payload \x00\xff"


def test_open_write_streams_and_reads_back(store):
    backend, path = resolve(store, "unit", "streamed.bin")
    with backend.open_write(path) as handle:
        handle.write(b"first,")
        handle.write(b"second")

    with backend.open_read(path) as reader:
        assert reader.read() == b"first,second"


def test_write_bytes_replaces_existing_object(store):
    backend, path = resolve(store, "unit", "data.bin")
    backend.write_bytes(path, b"old")
    backend.write_bytes(path, b"new")

    assert store.fs().cat_file(store.path("unit", "data.bin")) == b"new"


def test_open_write_error_leaves_no_object(store):
    backend, path = resolve(store, "unit", "partial.bin")
    with pytest.raises(Boom):
        with backend.open_write(path) as handle:
            handle.write(b"half of the payload")
            raise Boom()

    assert listed_names(store) == []
    assert not backend.exists(path)


def test_failed_multipart_write_leaves_no_object(store):
    if store.backend == "gs":
        pytest.skip(
            "gcp-storage-emulator answers 501 to the DELETE that cancels a resumable upload, "
            "and gcsfs retries it for about 30 s before statefs logs the failure."
        )
    options = dict(store.storage_options or {})
    if store.backend == "s3":
        options["default_block_size"] = SMALL_BLOCK
    if store.backend == "gs":
        options["block_size"] = SMALL_BLOCK
    backend, path = resolve(store, "unit", "large.bin", storage_options=options)

    with pytest.raises(Boom):
        with backend.open_write(path) as handle:
            handle.write(LARGE_PAYLOAD)
            handle.flush()
            raise Boom()

    assert listed_names(store) == []


def test_open_write_error_keeps_previous_object(store):
    backend, path = resolve(store, "unit", "data.bin")
    backend.write_bytes(path, b"committed bytes")
    with pytest.raises(Boom):
        with backend.open_write(path) as handle:
            handle.write(b"replacement that fails")
            raise Boom()

    assert store.fs().cat_file(store.path("unit", "data.bin")) == b"committed bytes"


def test_create_exclusive_writes_new_object(store):
    backend, path = resolve(store, "unit", "manifest.json")
    backend.create_exclusive(path, b"first")

    assert store.fs().cat_file(store.path("unit", "manifest.json")) == b"first"


def test_create_exclusive_rejects_existing_object(store):
    if store.backend == "gs":
        pytest.skip(
            "gcp-storage-emulator ignores ifGenerationMatch=0 and overwrites the object; "
            "real GCS enforces it. test_gcs_create_exclusive_sends_generation_precondition "
            "shows that the precondition is sent."
        )
    backend, path = resolve(store, "unit", "manifest.json")
    backend.create_exclusive(path, b"first")

    with pytest.raises(FileExistsError, match="manifest.json"):
        backend.create_exclusive(path, b"second")
    assert store.fs().cat_file(store.path("unit", "manifest.json")) == b"first"


def test_find_sees_foreign_write(store):
    backend, root = resolve(store)
    backend.write_bytes(backend.join(root, "a.bin"), b"a")
    assert set(backend.find(root)) == {"a.bin"}
    assert len(backend.list_dir(root)) == 1

    store.fs().pipe_file(store.path("b.bin"), b"b")

    assert set(backend.find(root)) == {"a.bin", "b.bin"}


def test_list_dir_sees_foreign_write(store):
    backend, root = resolve(store)
    backend.write_bytes(backend.join(root, "a.bin"), b"a")
    assert len(backend.list_dir(root)) == 1

    store.fs().pipe_file(store.path("b.bin"), b"b")

    names = sorted(info["name"].rstrip("/").rsplit("/", 1)[-1] for info in backend.list_dir(root))
    assert names == ["a.bin", "b.bin"]


def test_exists_sees_foreign_delete(store):
    backend, root = resolve(store)
    path = backend.join(root, "a.bin")
    backend.write_bytes(path, b"a")
    assert backend.exists(path)
    assert len(backend.list_dir(root)) == 1

    store.fs().rm_file(store.path("a.bin"))

    assert not backend.exists(path)


def test_empty_root_lists_nothing(store):
    backend, root = resolve(store)

    assert backend.find(root) == {}
    assert backend.list_dir(root) == []
    assert not backend.exists(backend.join(root, "anything"))


def test_find_returns_relative_paths_and_sizes(store):
    backend, root = resolve(store)
    backend.write_bytes(backend.join(root, "top.bin"), b"12345")
    backend.write_bytes(backend.join(root, "sub", "deep", "leaf.bin"), b"123")

    found = backend.find(root)

    assert sorted(found) == ["sub/deep/leaf.bin", "top.bin"]
    assert found["top.bin"]["size"] == 5
    assert found["sub/deep/leaf.bin"]["size"] == 3


def test_info_of_missing_object_raises(store):
    backend, path = resolve(store, "missing.bin")

    with pytest.raises(FileNotFoundError):
        backend.info(path)


def test_delete_missing_path_is_not_an_error(store):
    backend, root = resolve(store)

    backend.delete(backend.join(root, "missing.bin"))
    backend.delete_tree(backend.join(root, "missing-folder"))


def test_delete_tree_removes_every_object_below(store):
    backend, root = resolve(store)
    backend.write_bytes(backend.join(root, "unit", "a.bin"), b"a")
    backend.write_bytes(backend.join(root, "unit", "sub", "b.bin"), b"b")
    backend.write_bytes(backend.join(root, "sibling.bin"), b"c")

    backend.delete_tree(backend.join(root, "unit"))

    assert listed_names(store) == [store.path("sibling.bin")]


# The GCS emulator does not enforce preconditions, so these tests show that
# the backend sends them.


@pytest.fixture
def gcs_store(request, tmp_path):
    return make_store("gs", request, tmp_path)


def record_gcs_calls(fs, monkeypatch) -> list[tuple[str, dict]]:
    """Record the method and keyword arguments of every request the gcsfs instance sends."""
    calls: list[tuple[str, dict]] = []
    send = fs._call

    async def recording_call(method, path, *args, **kwargs):
        calls.append((method, kwargs))
        return await send(method, path, *args, **kwargs)

    monkeypatch.setattr(fs, "_call", recording_call)
    return calls


def test_gcs_create_exclusive_sends_generation_precondition(gcs_store, monkeypatch):
    backend, path = resolve(gcs_store, "unit", "manifest.json")
    calls = record_gcs_calls(backend.fs, monkeypatch)

    backend.create_exclusive(path, b"first")

    uploads = [kwargs for method, kwargs in calls if method == "POST"]
    assert len(uploads) == 1
    assert uploads[0].get("ifGenerationMatch") == "0"


def test_gcs_plain_write_sends_no_precondition(gcs_store, monkeypatch):
    backend, path = resolve(gcs_store, "unit", "data.bin")
    calls = record_gcs_calls(backend.fs, monkeypatch)

    backend.write_bytes(path, b"data")

    uploads = [kwargs for method, kwargs in calls if method == "POST"]
    assert uploads
    assert all("ifGenerationMatch" not in kwargs for kwargs in uploads)


def test_gcs_pipe_file_uses_create_mode(gcs_store, monkeypatch):
    backend, path = resolve(gcs_store, "unit", "manifest.json")
    modes = []
    pipe_file = backend.fs.pipe_file

    def recording_pipe_file(target, data, **kwargs):
        modes.append(kwargs.get("mode"))
        return pipe_file(target, data, **kwargs)

    monkeypatch.setattr(backend.fs, "pipe_file", recording_pipe_file)
    backend.create_exclusive(path, b"first")

    assert modes == ["create"]


# The registry.


@pytest.fixture
def isolated_registry(monkeypatch):
    """Let a test register backends and load entry points without affecting other tests."""
    monkeypatch.setattr(backends, "_registry", dict(backends._registry))
    monkeypatch.setattr(backends, "_entry_points_loaded", False)
    monkeypatch.setattr(GenericBackend, "_warned", set())


class FirstBackend(Backend):
    pass


class SecondBackend(Backend):
    pass


def memory_filesystem_for(protocol: str) -> type[MemoryFileSystem]:
    """Return an in-memory fsspec filesystem class registered under `protocol`, with its own store."""

    class ProtocolMemoryFileSystem(MemoryFileSystem):
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.removeprefix(f"{protocol}://"))

    ProtocolMemoryFileSystem.protocol = protocol
    fsspec.register_implementation(protocol, ProtocolMemoryFileSystem, clobber=True)
    return ProtocolMemoryFileSystem


def test_register_backend_rejects_second_class(isolated_registry):
    backends.register_backend("statefsdemo", FirstBackend)

    with pytest.raises(ValueError, match="overwrite=True") as raised:
        backends.register_backend("statefsdemo", SecondBackend)
    assert "FirstBackend" in str(raised.value)
    assert backends.backend_class("statefsdemo") is FirstBackend


def test_register_backend_accepts_same_class_again(isolated_registry):
    backends.register_backend("statefsdemo", FirstBackend)
    backends.register_backend("statefsdemo", FirstBackend)

    assert backends.backend_class("statefsdemo") is FirstBackend


def test_register_backend_overwrite_replaces_class(isolated_registry):
    backends.register_backend("statefsdemo", FirstBackend)
    backends.register_backend("statefsdemo", SecondBackend, overwrite=True)

    assert backends.backend_class("statefsdemo") is SecondBackend


def test_register_backend_protects_builtin_protocols(isolated_registry):
    with pytest.raises(ValueError, match="s3"):
        backends.register_backend("s3", FirstBackend)


def test_unknown_protocol_falls_back_with_warning(isolated_registry):
    memory_filesystem_for("statefsplain")

    with pytest.warns(BackendCapabilityWarning) as caught:
        backend, _ = backends.resolve("statefsplain://root/data.bin")

    assert type(backend) is GenericBackend
    message = str(caught[0].message)
    assert "'statefsplain'" in message
    assert "atomic writes" in message
    assert "exclusive create" in message


def test_generic_backend_writes_and_rejects_existing_object(isolated_registry):
    memory_filesystem_for("statefsplain")
    with pytest.warns(BackendCapabilityWarning):
        backend, path = backends.resolve("statefsplain://root/manifest.json")

    backend.create_exclusive(path, b"first")

    with pytest.raises(FileExistsError):
        backend.create_exclusive(path, b"second")
    assert backend.read_bytes(path) == b"first"


def test_generic_failed_write_keeps_writer_error(isolated_registry):
    memory_filesystem_for("statefsplain")
    with pytest.warns(BackendCapabilityWarning):
        backend, path = backends.resolve("statefsplain://root/partial.bin")

    with pytest.raises(Boom):
        with backend.open_write(path) as handle:
            handle.write(b"half of the payload")
            raise Boom()

    assert not backend.exists(path)


def write_plugin_distribution(folder, protocol: str) -> None:
    """Write an installed-looking distribution whose entry point adds a backend for `protocol`."""
    folder.mkdir()
    (folder / "statefs_demo_plugin.py").write_text(
        textwrap.dedent(
            f"""
            from statefs.backends import Backend, Capabilities


            class DemoBackend(Backend):
                protocols = ({protocol!r},)
                capabilities = Capabilities(atomic_write=True, exclusive_create=True)
            """
        )
    )
    dist_info = folder / "statefs_demo_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: statefs-demo-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[statefs.backends]\n{protocol} = statefs_demo_plugin:DemoBackend\n"
    )


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch, isolated_registry):
    protocol = "statefsplugin"
    write_plugin_distribution(tmp_path / "site", protocol)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield protocol
    sys.modules.pop("statefs_demo_plugin", None)


def test_entry_point_backend_is_used(plugin_on_path):
    memory_filesystem_for(plugin_on_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendCapabilityWarning)
        backend, path = backends.resolve(f"{plugin_on_path}://root/data.bin")

    assert type(backend).__name__ == "DemoBackend"
    assert type(backend).__module__ == "statefs_demo_plugin"
    backend.write_bytes(path, b"through the plugin")
    assert backend.read_bytes(path) == b"through the plugin"


def test_missing_fsspec_package_is_named_in_error():
    if importlib.util.find_spec("adlfs") is not None:
        pytest.skip("adlfs is installed, so abfs:// does not fail on import")

    with pytest.raises(ImportError, match="adlfs") as raised:
        statefs.CheckpointManager("abfs://container/run/ckpt")
    assert "abfs://container/run/ckpt" in str(raised.value)


# Endpoints and regions of S3-compatible stores.


@pytest.fixture
def s3_store(request, tmp_path):
    return make_store("s3", request, tmp_path)


def unused_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_s3_endpoint_and_region_from_storage_options(s3_store):
    options = dict(s3_store.storage_options)
    options["client_kwargs"] = {"region_name": "eu-west-2"}

    manager = statefs.CheckpointManager(s3_store.url("ckpt"), storage_options=options)
    manager.backend.write_bytes(manager.backend.join(manager.path, "probe.bin"), b"reached")

    assert manager.latest() is None
    assert manager.backend.fs.s3.meta.region_name == "eu-west-2"
    assert manager.backend.fs.s3.meta.endpoint_url == options["endpoint_url"]
    assert s3_store.fs().cat_file(s3_store.path("ckpt", "probe.bin")) == b"reached"


@pytest.mark.parametrize(
    "protocol, credentials",
    [
        ("s3", {"key": "statefs-test", "secret": "statefs-test", "client_kwargs": {"region_name": "us-east-1"}}),
        ("gs", {"token": "anon", "project": "statefs-test"}),
    ],
)
def test_unreachable_endpoint_fails_fast_naming_it(protocol, credentials):
    endpoint = f"http://127.0.0.1:{unused_local_port()}"
    options = {"endpoint_url": endpoint, **credentials}

    started = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        statefs.CheckpointManager(f"{protocol}://{BUCKET}/run/ckpt", storage_options=options)
    elapsed = time.monotonic() - started

    assert endpoint in str(raised.value)
    assert elapsed < 5


# Test isolation: real servers on 127.0.0.1, reset between tests.


def test_s3_endpoint_is_local_http_server(s3_store):
    import urllib.request

    endpoint = s3_store.storage_options["endpoint_url"]
    assert endpoint.startswith("http://127.0.0.1:")

    with urllib.request.urlopen(endpoint, timeout=5) as response:
        body = response.read()
    assert response.status == 200
    assert b"ListAllMyBucketsResult" in body


# Instances created by earlier runs of the isolation test. They stay
# referenced, so no id can be reused.
_earlier_s3_instances: list = []


@pytest.mark.parametrize("run", ["first", "second"])
def test_s3_state_resets_between_tests(s3_store, run):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_store.storage_options)
    assert fs is s3fs.S3FileSystem(**s3_store.storage_options)
    assert all(fs is not earlier for earlier in _earlier_s3_instances)
    _earlier_s3_instances.append(fs)

    marker = s3_store.path(f"written-by-{run}.txt")
    fs.pipe_file(marker, run.encode())

    assert fs.ls("", refresh=True) == [BUCKET]
    assert fs.find(BUCKET) == [marker]


def test_s3_missing_bucket_named_before_training(s3_server):
    options = s3_server.storage_options()

    with pytest.raises(FileNotFoundError, match="'no-such-bucket' does not exist"):
        statefs.CheckpointManager("s3://no-such-bucket/run/ckpt", storage_options=options)


def test_s3_single_part_upload_sends_crc32c(s3_server, monkeypatch):
    s3_server.reset()
    s3_server.create_bucket("crc-bucket")
    backend, path = backends.resolve("s3://crc-bucket/a/file.bin", s3_server.storage_options())
    sent = []
    original = backend.fs.call_s3

    def record(method, *args, **kwargs):
        sent.append((method, kwargs.get("ChecksumCRC32C")))
        return original(method, *args, **kwargs)

    # s3fs binds the synchronous call_s3 on each instance, and S3File uses it.
    monkeypatch.setattr(backend.fs, "call_s3", record)
    data = b"statefs" * 1000

    with backend.open_write(path) as handle:
        handle.write(data)

    assert ("put_object", digest_bytes(data).crc32c) in sent


def test_s3_native_checksum_absent_on_moto(s3_server):
    # moto neither checks nor keeps a client CRC32C, so verification falls
    # back to reading the object; real S3 returns the value here.
    s3_server.reset()
    s3_server.create_bucket("crc-bucket")
    backend, path = backends.resolve("s3://crc-bucket/a/file.bin", s3_server.storage_options())
    backend.write_bytes(path, b"statefs")

    assert backend.native_checksum(backend.info(path)) is None
