"""statefs.verify and `statefs verify`: what passes, what fails, and what is only a note.

The stored state (two checkpoints, one version, one snapshot) is saved once
on local disk and copied byte for byte to each backend, so every test
starts from real Keras files without training or exporting again.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

import statefs
from conftest import build_model
from statefs.backends.gcs import GCSBackend
from statefs.cli import main
from statefs.integrity import (
    CHECKSUM_MISMATCH,
    MISSING_FILE,
    NO_RECORDED_CHECKSUM,
    NOT_COMMITTED,
    NOTHING_TO_VERIFY,
    SIZE_MISMATCH,
)

MANIFEST = "statefs-manifest.json"
CLAIM = ".statefs-claim"
SIDECAR = ".statefs-manifest.json"
STATE = "state.bin"


@pytest.fixture(scope="module")
def saved_state(digits, tmp_path_factory):
    """A local folder with ckpt/ckpt-1, ckpt/ckpt-2, models/1 and snap/digits.keras, all committed."""
    folder = tmp_path_factory.mktemp("saved-state")
    model = build_model()
    x, y, _, _ = digits
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    manager = statefs.CheckpointManager(str(folder / "ckpt"))
    manager.save(model, step=1, epoch=1)
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    manager.save(model, step=2, epoch=2)
    statefs.VersionRegistry(str(folder / "models")).publish(model)
    statefs.save_snapshot(model, str(folder / "snap" / "digits.keras"))
    return folder


def upload_state(store, saved_state, name: str) -> str:
    """Copy the saved folder `name` to the store's root byte for byte, and return its URL."""
    fs = store.fs()
    local_root = saved_state / name
    for parent, _, files in os.walk(local_root):
        for file_name in files:
            relative = os.path.relpath(os.path.join(parent, file_name), local_root).split(os.sep)
            put_bytes(store, (local_root.joinpath(*relative)).read_bytes(), name, *relative, fs=fs)
    return store.url(name)


def put_bytes(store, data: bytes, *parts: str, fs=None) -> None:
    """Write one object under the store's root with a new filesystem instance."""
    fs = fs or store.fs()
    if store.backend == "file":
        fs.makedirs(store.path(*parts[:-1]), exist_ok=True)
    fs.pipe_file(store.path(*parts), data)


def flip_middle_byte(store, *parts: str) -> tuple[bytes, bytes]:
    """Invert one byte of a stored file, and return its bytes before and after."""
    fs = store.fs()
    before = fs.cat_file(store.path(*parts))
    after = bytearray(before)
    after[len(after) // 2] ^= 0xFF
    fs.pipe_file(store.path(*parts), bytes(after))
    return before, bytes(after)


def stored_url(store, *parts: str) -> str:
    """Return the URL statefs reports for a stored file."""
    return store.fs().unstrip_protocol(store.path(*parts))


def option_flags(storage_options: dict | None) -> list[str]:
    """Turn storage options into repeated `--option KEY=VALUE` arguments, with strings unquoted."""
    flags = []
    for key, value in (storage_options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        flags += ["--option", f"{key}={text}"]
    return flags


def verify(store, *parts: str) -> statefs.VerificationReport:
    return statefs.verify(store.url(*parts), storage_options=store.storage_options)


def recorded_sizes(saved_state, *parts: str) -> int:
    manifest = json.loads((saved_state.joinpath(*parts)).read_text())
    return sum(entry["size"] for entry in manifest["files"].values())


# What passes.


# URL parts of each target, and the units and snapshots verify reports for it.
GOOD_TARGETS = [
    (("ckpt",), ["ckpt/ckpt-1", "ckpt/ckpt-2"], []),
    (("ckpt", "ckpt-2"), ["ckpt/ckpt-2"], []),
    (("models",), ["models/1"], []),
    (("models", "1"), ["models/1"], []),
    (("snap",), [], ["snap/digits.keras"]),
    (("snap", "digits.keras"), [], ["snap/digits.keras"]),
    (("snap", "digits.keras" + SIDECAR), [], ["snap/digits.keras"]),
]


def test_verify_passes_intact_state(store, saved_state):
    for name in ("ckpt", "models", "snap"):
        upload_state(store, saved_state, name)

    for parts, units, snapshots in GOOD_TARGETS:
        report = verify(store, *parts)

        assert report.ok, (parts, report.problems)
        assert report.units == [stored_url(store, *unit.split("/")) for unit in units], parts
        assert report.snapshots == [stored_url(store, *snapshot.split("/")) for snapshot in snapshots], parts


def test_report_counts_files_and_bytes(store, saved_state):
    upload_state(store, saved_state, "ckpt")

    report = verify(store, "ckpt")

    # Each checkpoint contains state.bin and state.json.
    assert report.files == 4
    assert report.bytes == recorded_sizes(saved_state, "ckpt", "ckpt-1", MANIFEST) + recorded_sizes(
        saved_state, "ckpt", "ckpt-2", MANIFEST
    )


def test_version_report_counts_every_file(store, saved_state):
    upload_state(store, saved_state, "models")

    report = verify(store, "models", "1")

    recorded = json.loads((saved_state / "models" / "1" / MANIFEST).read_text())["files"]
    assert report.files == len(recorded) == 5
    assert report.bytes == sum(entry["size"] for entry in recorded.values())


# What fails.


def test_empty_root_is_nothing_to_verify(store):
    report = verify(store, "ckpt")

    assert not report.ok
    assert [problem.kind for problem in report.problems] == [NOTHING_TO_VERIFY]
    assert report.problems[0].url == stored_url(store, "ckpt")


def test_missing_snapshot_url_is_nothing_to_verify(store, saved_state):
    upload_state(store, saved_state, "snap")

    report = verify(store, "snap", "other.keras")

    assert [problem.kind for problem in report.problems] == [NOTHING_TO_VERIFY]


def test_snapshot_without_sidecar_is_problem(store, saved_state):
    upload_state(store, saved_state, "snap")
    store.fs().rm_file(store.path("snap", "digits.keras" + SIDECAR))

    report = verify(store, "snap", "digits.keras")

    assert [problem.kind for problem in report.problems] == [NO_RECORDED_CHECKSUM]
    assert "no recorded checksum" in report.problems[0].message
    assert "digits.keras.statefs-manifest.json" in report.problems[0].message


def test_sidecar_without_snapshot_is_missing_file(store, saved_state):
    upload_state(store, saved_state, "snap")
    store.fs().rm_file(store.path("snap", "digits.keras"))

    report = verify(store, "snap")

    assert [problem.kind for problem in report.problems] == [MISSING_FILE]
    assert report.problems[0].url == stored_url(store, "snap", "digits.keras")


def test_fragment_url_is_not_committed(store):
    put_bytes(store, json.dumps({"time": time.time()}).encode(), "ckpt", "ckpt-3", CLAIM)

    report = verify(store, "ckpt", "ckpt-3")

    assert [problem.kind for problem in report.problems] == [NOT_COMMITTED]


def test_root_reports_every_damaged_unit(store, saved_state):
    upload_state(store, saved_state, "ckpt")
    flip_middle_byte(store, "ckpt", "ckpt-1", STATE)
    data = store.fs().cat_file(store.path("ckpt", "ckpt-2", STATE))
    store.fs().pipe_file(store.path("ckpt", "ckpt-2", STATE), data[:100])

    report = verify(store, "ckpt")

    assert [(problem.kind, problem.url) for problem in report.problems] == [
        (CHECKSUM_MISMATCH, stored_url(store, "ckpt", "ckpt-1", STATE)),
        (SIZE_MISMATCH, stored_url(store, "ckpt", "ckpt-2", STATE)),
    ]
    assert report.problems[1].expected == len(data)
    assert report.problems[1].found == 100


def test_version_damage_outside_keras_file_detected(store, saved_state):
    upload_state(store, saved_state, "models")
    flip_middle_byte(store, "models", "1", "saved_model.pb")

    report = verify(store, "models")

    assert [problem.kind for problem in report.problems] == [CHECKSUM_MISMATCH]
    assert report.problems[0].url == stored_url(store, "models", "1", "saved_model.pb")


# What is only a note.


def test_fragment_under_root_is_note(store, saved_state):
    upload_state(store, saved_state, "ckpt")
    fs = store.fs()
    put_bytes(store, json.dumps({"time": time.time()}).encode(), "ckpt", "ckpt-3", CLAIM, fs=fs)
    put_bytes(store, b"partial", "ckpt", "ckpt-3", STATE, fs=fs)

    report = verify(store, "ckpt")

    assert report.ok
    assert len(report.units) == 2
    assert [note.url for note in report.notes] == [stored_url(store, "ckpt", "ckpt-3")]
    assert report.notes[0].message.startswith("not committed")


def test_foreign_items_in_root_are_notes(store, saved_state):
    upload_state(store, saved_state, "models")
    fs = store.fs()
    put_bytes(store, b"hello", "models", "README.txt", fs=fs)
    put_bytes(store, b"x", "models", "drafts", "plan.txt", fs=fs)
    put_bytes(store, b"x", "models", "7", "saved_model.pb", fs=fs)

    report = verify(store, "models")

    assert report.ok
    notes = {note.url: note.message for note in report.notes}
    assert set(notes) == {
        stored_url(store, "models", "README.txt"),
        stored_url(store, "models", "drafts"),
        stored_url(store, "models", "7"),
    }
    assert "neither a claim nor a manifest" in notes[stored_url(store, "models", "7")]


def test_unlisted_file_in_unit_is_note(store, saved_state):
    upload_state(store, saved_state, "ckpt")
    put_bytes(store, b"extra", "ckpt", "ckpt-2", "extra.bin")

    report = verify(store, "ckpt", "ckpt-2")

    assert report.ok
    assert [note.url for note in report.notes] == [stored_url(store, "ckpt", "ckpt-2", "extra.bin")]


def test_version_under_checkpoint_root_is_note(store, saved_state):
    upload_state(store, saved_state, "models")
    fs = store.fs()
    for name in fs.find(store.path("models", "1")):
        relative = name[len(store.path("models", "1")) + 1 :]
        put_bytes(store, fs.cat_file(name), "ckpt", "ckpt-5", *relative.split("/"), fs=fs)

    report = verify(store, "ckpt")

    assert report.ok
    assert report.units == [stored_url(store, "ckpt", "ckpt-5")]
    assert "of kind 'version', not 'checkpoint'" in report.notes[0].message


# Reading.


def test_gcs_verify_streams_no_object(request, tmp_path, saved_state, monkeypatch):
    from conftest import make_store

    store = make_store("gs", request, tmp_path)
    for name in ("ckpt", "models", "snap"):
        upload_state(store, saved_state, name)

    def fail_on_read(self, path):
        raise AssertionError(f"verify streamed {path} although GCS lists its CRC32C")

    monkeypatch.setattr(GCSBackend, "open_read", fail_on_read)

    for name in ("ckpt", "models", "snap"):
        assert verify(store, name).ok


# The command line.


def test_cli_verify_ok_exits_zero(store, saved_state, capsys):
    url = upload_state(store, saved_state, "ckpt")

    status = main(["verify", url, *option_flags(store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines == [f"OK {stored_url(store, 'ckpt')}: verified 2 units, 0 snapshots, 4 files, {verify(store, 'ckpt').bytes} bytes"]


def test_cli_verify_prints_one_line_per_problem(store, saved_state, capsys):
    url = upload_state(store, saved_state, "ckpt")
    flip_middle_byte(store, "ckpt", "ckpt-1", STATE)
    store.fs().rm_file(store.path("ckpt", "ckpt-2", STATE))

    status = main(["verify", url, *option_flags(store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    expected_checksum = json.loads((saved_state / "ckpt" / "ckpt-1" / MANIFEST).read_text())["files"][STATE]["crc32c"]
    assert status == 1
    assert len(lines) == 3
    assert lines[0].startswith(f"{stored_url(store, 'ckpt', 'ckpt-1', STATE)}: checksum mismatch: crc32c is ")
    assert lines[0].endswith(f"expected {expected_checksum!r}")
    assert lines[1] == f"{stored_url(store, 'ckpt', 'ckpt-2', STATE)}: missing: listed in the manifest but not found"
    assert lines[2].startswith(f"FAILED {stored_url(store, 'ckpt')}: 2 problems in 2 units")


def test_cli_verify_json_matches_report(store, saved_state, capsys):
    url = upload_state(store, saved_state, "snap")
    put_bytes(store, b"not a manifest", "snap", "digits.keras" + SIDECAR)

    status = main(["verify", url, "--json", *option_flags(store.storage_options)])

    document = json.loads(capsys.readouterr().out)
    assert status == 1
    assert document == verify(store, "snap").to_dict()
    assert document["ok"] is False
    assert [problem["kind"] for problem in document["problems"]] == ["invalid-manifest"]


def test_cli_verify_notes_do_not_fail(store, saved_state, capsys):
    url = upload_state(store, saved_state, "models")
    put_bytes(store, b"hello", "models", "README.txt")

    status = main(["verify", url, *option_flags(store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines[0] == f"note: {stored_url(store, 'models', 'README.txt')}: not checked: no sidecar manifest records its checksum"
    assert lines[1].startswith("OK ")


def test_cli_verify_unreachable_endpoint_fails(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    status = main(["verify", "s3://bucket/ckpt", "--option", f"endpoint_url=http://127.0.0.1:{port}"])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.startswith("statefs: error: ")
    assert f"127.0.0.1:{port}" in captured.err


def test_cli_verify_does_not_import_tensorflow(saved_state, run_fresh):
    urls = [str(saved_state / name) for name in ("ckpt", "models", "snap")] + [str(saved_state / "snap" / "digits.keras")]

    output = run_fresh(
        f"""
        import json, sys
        from statefs.cli import main
        statuses = [main(["verify", url]) for url in {urls!r}]
        print(json.dumps({{"statuses": statuses, "loaded": sorted({{"tensorflow", "keras"}} & set(sys.modules))}}))
        """
    )

    result = json.loads(output.splitlines()[-1])
    assert result["statuses"] == [0, 0, 0, 0]
    assert result["loaded"] == []

