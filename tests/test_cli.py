"""The `statefs` command line: migrate, ls, demo and --version."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

import statefs
from statefs.cli import main, parse_option
from statefs import demo
from statefs.demo import StoredCopy, print_report, reload_copies

# The absl format of TensorFlow's native log lines, such as "I0000 00:00:17.5 ...".
NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)
DEMO_ROWS = 7


def option_flags(flag: str, storage_options: dict | None) -> list[str]:
    """Turn storage options into repeated `flag KEY=VALUE` arguments, with strings unquoted."""
    flags = []
    for key, value in (storage_options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        flags += [flag, f"{key}={text}"]
    return flags


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m statefs.cli` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "statefs.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def put_bytes(store, data: bytes, *parts: str) -> None:
    """Write one object under the store's root with a new filesystem instance."""
    fs = store.fs()
    if store.backend == "file":
        fs.makedirs(store.path(*parts[:-1]), exist_ok=True)
    fs.pipe_file(store.path(*parts), data)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --version and options


def test_version_prints_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"statefs {statefs.__version__}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retries=3", ("retries", 3)),
        ("anon=true", ("anon", True)),
        ('client_kwargs={"region_name": "us-east-1"}', ("client_kwargs", {"region_name": "us-east-1"})),
        ("endpoint_url=http://127.0.0.1:9000", ("endpoint_url", "http://127.0.0.1:9000")),
        ("token=a=b", ("token", "a=b")),
        ("profile=", ("profile", "")),
    ],
)
def test_option_value_is_json_or_string(text, expected):
    assert parse_option(text) == expected


def test_option_without_equals_is_usage_error(capsys, tmp_path):
    status = main(["migrate", str(tmp_path / "a.keras"), str(tmp_path / "b"), "--src-option", "anon"])

    assert status == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


# migrate


def test_migrate_snapshot_from_file_prints_line(store, tmp_path, capsys):
    source = tmp_path / "digits.keras"
    source.write_bytes(b"snapshot bytes, copied without being parsed")
    destination = store.url("exported", "digits.keras")

    status = main(["migrate", str(source), destination, *option_flags("--dst-option", store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert len(lines) == 1
    assert lines[0].startswith("copied snapshot file://")
    assert f"→ {store.fs().unstrip_protocol(store.path('exported', 'digits.keras'))}:" in lines[0]
    assert f"1 file, {source.stat().st_size} bytes" in lines[0]
    assert store.fs().cat_file(store.path("exported", "digits.keras")) == source.read_bytes()


def test_migrate_snapshot_to_file_folder(store, tmp_path, capsys):
    data = b"snapshot bytes on a store"
    put_bytes(store, data, "snap", "digits.keras")
    target_folder = tmp_path / "exported"

    status = main(
        ["migrate", store.url("snap", "digits.keras"), str(target_folder), *option_flags("--src-option", store.storage_options)]
    )

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert len(lines) == 1
    assert lines[0].startswith("copied snapshot ")
    assert f"→ file://{target_folder / 'digits.keras'}" in lines[0]
    assert (target_folder / "digits.keras").read_bytes() == data


def test_migrate_root_prints_skipped_units(tmp_path, model, capsys):
    source = tmp_path / "ckpt"
    statefs.CheckpointManager(str(source)).save(model, step=1, epoch=1)
    (source / "ckpt-2").mkdir()
    (source / "ckpt-2" / ".statefs-claim").write_text("{}")

    status = main(["migrate", str(source), str(tmp_path / "copy")])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert len(lines) == 2
    assert lines[0].startswith(f"copied checkpoint file://{source}/ckpt-1 → file://{tmp_path}/copy/ckpt-1: 2 files, ")
    assert lines[1] == f"skipped file://{source}/ckpt-2: not committed"


def test_migrate_missing_source_fails_in_one_line(tmp_path):
    missing = tmp_path / "missing" / "digits.keras"

    completed = run_cli("migrate", str(missing), str(tmp_path / "exported"))

    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr.count("\n") == 1
    assert completed.stderr.startswith("statefs: error: ")
    assert str(missing) in completed.stderr


def test_migrate_onto_different_unit_fails(tmp_path, model, digits, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    x, y, _, _ = digits
    statefs.VersionRegistry(str(first)).publish(model)
    model.fit(x[:64], y[:64], epochs=1, verbose=0)
    statefs.VersionRegistry(str(second)).publish(model)

    status = main(["migrate", str(first / "1"), str(second / "1")])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.startswith("statefs: error: ")
    assert "different committed version" in captured.err


# ls


def test_ls_empty_root_lists_nothing(store, capsys):
    status = main(["ls", store.url("models", "digits"), *option_flags("--option", store.storage_options)])

    output = capsys.readouterr().out
    assert status == 0
    assert output.strip().endswith("no committed checkpoints, versions or snapshots")


def test_ls_version_root_lists_numbers_and_sizes(store, model, capsys):
    registry = statefs.VersionRegistry(store.url("models", "digits"), storage_options=store.storage_options)
    registry.publish(model, metadata={"val_accuracy": 0.5})
    registry.publish(model, metadata={"val_accuracy": 0.75})

    status = main(["ls", store.url("models", "digits"), *option_flags("--option", store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0].endswith(": 2 committed versions")
    assert lines[1].split() == ["version", "files", "KiB", "created", "metadata"]
    for line, number, val_accuracy in zip(lines[2:], (1, 2), ("0.5", "0.75")):
        manifest = registry.manifest(number)
        fields = line.split()
        assert fields[0] == str(number)
        assert fields[1] == str(len(manifest.files))
        assert fields[2] == str(round(manifest.total_size() / 1024, 1))
        assert fields[-1] == f"val_accuracy={val_accuracy}"


def test_ls_checkpoints_show_step_epoch_metrics(store, model, capsys):
    manager = statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options)
    manager.save(model, step=7, epoch=2, batch=5, metrics={"loss": 0.25, "accuracy": 0.875})

    status = main(["ls", store.url("ckpt"), *option_flags("--option", store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0].endswith(": 1 committed checkpoint")
    assert lines[1].split() == ["step", "epoch", "batch", "KiB", "created", "metrics"]
    fields = lines[2].split()
    assert fields[:3] == ["7", "2", "5"]
    assert fields[-2:] == ["accuracy=0.875", "loss=0.25"]


def test_ls_reports_unit_without_manifest(store, capsys):
    put_bytes(store, b"{}", "models", "3", ".statefs-claim")

    status = main(["ls", store.url("models"), *option_flags("--option", store.storage_options)])

    output = capsys.readouterr().out
    assert status == 0
    assert "no committed checkpoints, versions or snapshots" in output
    assert "not committed (no manifest): 3" in output


def test_ls_snapshot_shows_size_and_checksum(store, model, capsys):
    snapshot = statefs.save_snapshot(model, store.url("digits.keras"), storage_options=store.storage_options)

    status = main(["ls", store.url("digits.keras"), *option_flags("--option", store.storage_options)])

    output = capsys.readouterr().out
    assert status == 0
    assert f"size    {snapshot.size} bytes" in output
    assert f"crc32c  {snapshot.crc32c} (recorded in digits.keras.statefs-manifest.json)" in output


def test_ls_unreachable_endpoint_names_it(capsys):
    endpoint = f"http://127.0.0.1:{unused_port()}"

    status = main(["ls", "s3://bucket/models", "--option", f"endpoint_url={endpoint}"])

    error = capsys.readouterr().err
    assert status == 1
    assert error.count("\n") == 1
    assert error.startswith("statefs: error: Cannot reach the storage endpoint")
    assert endpoint in error


def test_ls_does_not_import_tensorflow(tmp_path, model, run_fresh):
    statefs.VersionRegistry(str(tmp_path / "models")).publish(model)
    statefs.CheckpointManager(str(tmp_path / "ckpt")).save(model, epoch=1)
    statefs.save_snapshot(model, str(tmp_path / "digits.keras"))
    urls = [str(tmp_path / "models"), str(tmp_path / "models" / "1"), str(tmp_path / "ckpt"), str(tmp_path / "digits.keras")]

    output = run_fresh(
        f"""
        import json, sys
        from statefs.cli import main
        statuses = [main(["ls", url]) for url in {urls!r}]
        print(json.dumps({{"statuses": statuses, "loaded": sorted({{"tensorflow", "keras"}} & set(sys.modules))}}))
        """
    )

    result = json.loads(output.splitlines()[-1])
    assert result["statuses"] == [0, 0, 0, 0]
    assert result["loaded"] == []
    assert "1 committed version" in output
    assert "committed version, 5 files" in output
    assert "1 committed checkpoint" in output
    assert "crc32c" in output


# demo


def test_demo_rejects_non_empty_workdir(tmp_path, capsys):
    (tmp_path / "left-over.txt").write_text("x")

    status = main(["demo", "--storage", "file", "--workdir", str(tmp_path)])

    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("statefs: error: The demo folder")
    assert "not empty" in error


def test_demo_stops_servers_on_error(monkeypatch, capsys):
    def fail(stores, epochs):
        raise OSError("training failed")

    monkeypatch.setattr(demo, "_train_and_store", fail)

    with pytest.raises(OSError, match="training failed"):
        demo.run_demo(storage="servers")

    endpoints = re.findall(r"http://127\.0\.0\.1:(\d+)", capsys.readouterr().out)
    assert len(endpoints) == 2
    for port in endpoints:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()


def test_demo_report_fails_on_different_accuracy(capsys):
    copies = [
        StoredCopy("version 1", "memory://m/1", 10, 0.1, 0.5, {}, reloaded_accuracy=0.5),
        StoredCopy("version 2", "memory://m/2", 10, 0.1, 0.75, {}, reloaded_accuracy=0.7),
        StoredCopy("snapshot", "memory://m/s.keras", 10, 0.1, 0.75, {}, error="FileNotFoundError: gone"),
    ]

    status = print_report(copies)

    captured = capsys.readouterr()
    assert status == 1
    assert "version 1 at" not in captured.err
    assert "version 2 at memory://m/2: 0.7 instead of 0.75" in captured.err
    assert "snapshot at memory://m/s.keras: FileNotFoundError: gone" in captured.err


def test_demo_report_passes_when_all_equal(capsys):
    copies = [StoredCopy("version 1", "memory://m/1", 2048, 0.1, 0.5, {}, reloaded_accuracy=0.5)]

    status = print_report(copies)

    output = capsys.readouterr().out
    assert status == 0
    assert "version 1  memory://m/1  2.0" in output


def test_demo_reload_reports_missing_copy(tmp_path):
    results = reload_copies([{"kind": "snapshot", "url": str(tmp_path / "missing.keras")}])

    assert len(results) == 1
    assert results[0]["error"].startswith("FileNotFoundError: ")


def check_demo_output(completed: subprocess.CompletedProcess) -> list[str]:
    """Assert that the demo passed, and return its table rows."""
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("copy "))
    assert lines[header].split("  ")[0] == "copy"
    rows = lines[header + 1 : header + 1 + DEMO_ROWS]
    assert len(rows) == DEMO_ROWS
    assert all(row.endswith("  yes") for row in rows)
    assert f"All {DEMO_ROWS} copies, reloaded in a fresh process" in completed.stdout
    assert not NATIVE_LOG_LINE.search(completed.stderr), completed.stderr[-4000:]
    return rows


@pytest.mark.slow
def test_demo_with_local_folders_passes(tmp_path):
    workdir = tmp_path / "demo"

    completed = run_cli("demo", "--storage", "file", "--workdir", str(workdir), "--epochs", "2", timeout=300)

    rows = check_demo_output(completed)
    assert rows[0].startswith("checkpoint step ")
    assert f"file://{workdir}/store-b/models/digits/1" in rows[1]
    assert (workdir / "exported" / "snapshots" / "digits.keras").is_file()


@pytest.mark.slow
def test_demo_with_servers_passes():
    completed = run_cli("demo", "--epochs", "2", timeout=300)

    rows = check_demo_output(completed)
    assert "s3://statefs-demo/run/ckpt/ckpt-" in rows[0]
    assert "gs://statefs-demo/models/digits/1" in rows[1]
    assert "s3://statefs-demo/models/digits/1" in rows[4]
    assert "gcp_storage_emulator" not in completed.stderr
