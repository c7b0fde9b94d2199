"""statefs.collect_garbage and `statefs gc`: what is removed, what is kept, and why.

Fragments are made the way a killed writer leaves them: a claim, maybe some
payload, no manifest. The claim's recorded time sets their age, so a test
makes an old fragment by writing an old time, on every backend.
"""

from __future__ import annotations

import json
import os
import time

import pytest

import statefs
from conftest import build_model
from statefs import backends
from statefs.cli import main
from statefs.commit import UnitWriter
from test_verify import option_flags, put_bytes, stored_url

MANIFEST = "statefs-manifest.json"
CLAIM = ".statefs-claim"
SIDECAR = ".statefs-manifest.json"
HOUR = 3600.0


def leave_fragment(store, *parts: str, age: float, payload: bytes = b"partial payload") -> None:
    """Leave what a writer killed `age` seconds after its claim leaves: a claim and part of a file."""
    claim = {"host": "trainer-1", "pid": 4242, "time": time.time() - age}
    fs = store.fs()
    put_bytes(store, json.dumps(claim).encode(), *parts, CLAIM, fs=fs)
    put_bytes(store, payload, *parts, "checkpoint.weights.h5", fs=fs)


def commit_unit(store, tmp_path, *parts: str, kind: str = "checkpoint") -> None:
    """Commit a small unit through the commit protocol, without Keras."""
    local = tmp_path / "payload.bin"
    local.write_bytes(b"weights" * 100)
    backend, root = backends.resolve(store.url(), store.storage_options)
    writer = UnitWriter(backend, backend.join(root, *parts), kind=kind)
    with writer.claimed():
        writer.put_file(str(local), "payload.bin")
        writer.commit()


def stored_files(store) -> list[str]:
    """Return every file under the root, relative to it, as a new filesystem instance lists them."""
    fs = store.fs()
    root = store.path().rstrip("/") + "/"
    try:
        return sorted(name[len(root):] for name in fs.find(root))
    except FileNotFoundError:
        return []


def collect(store, *parts: str, **kwargs) -> statefs.GarbageReport:
    return statefs.collect_garbage(store.url(*parts), storage_options=store.storage_options, **kwargs)


# What is removed.


def test_gc_removes_old_fragment(store, tmp_path):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    leave_fragment(store, "ckpt", "ckpt-2", age=2 * HOUR)

    report = collect(store, "ckpt")

    assert [(item.url, item.kind) for item in report.removed] == [(stored_url(store, "ckpt", "ckpt-2"), "fragment")]
    assert report.removed[0].age == pytest.approx(2 * HOUR, abs=60)
    assert not any(name.startswith("ckpt/ckpt-2/") for name in stored_files(store))


def test_gc_removes_old_version_fragment(store, tmp_path):
    commit_unit(store, tmp_path, "models", "1", kind="version")
    leave_fragment(store, "models", "2", age=2 * HOUR)

    report = collect(store, "models")

    assert [item.url for item in report.removed] == [stored_url(store, "models", "2")]
    assert report.committed == [stored_url(store, "models", "1")]


def test_gc_removes_fragment_given_as_url(store):
    leave_fragment(store, "ckpt", "ckpt-2", age=2 * HOUR)

    report = collect(store, "ckpt", "ckpt-2")

    assert [item.url for item in report.removed] == [stored_url(store, "ckpt", "ckpt-2")]
    assert stored_files(store) == []


def test_gc_ages_unreadable_claim_by_mtime(store):
    put_bytes(store, b"\x00 not json", "ckpt", "ckpt-2", CLAIM)

    young = collect(store, "ckpt")
    removed = collect(store, "ckpt", grace_period=0)

    assert [item.reason for item in young.kept] == ["younger than the grace period, so a writer may still be running"]
    assert young.kept[0].age == pytest.approx(0, abs=300)
    assert [item.url for item in removed.removed] == [stored_url(store, "ckpt", "ckpt-2")]


# What is kept.


def test_gc_keeps_young_fragment(store):
    leave_fragment(store, "ckpt", "ckpt-2", age=60)

    report = collect(store, "ckpt")

    assert report.removed == []
    assert [(item.url, item.kind) for item in report.kept] == [(stored_url(store, "ckpt", "ckpt-2"), "fragment")]
    assert stored_files(store) == ["ckpt/ckpt-2/.statefs-claim", "ckpt/ckpt-2/checkpoint.weights.h5"]


def test_gc_grace_period_sets_minimum_age(store):
    leave_fragment(store, "ckpt", "ckpt-2", age=120)

    report = collect(store, "ckpt", grace_period=60)

    assert [item.url for item in report.removed] == [stored_url(store, "ckpt", "ckpt-2")]


def test_gc_keeps_committed_units(store, tmp_path):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    commit_unit(store, tmp_path, "ckpt", "ckpt-2")
    before = stored_files(store)

    report = collect(store, "ckpt", grace_period=0)

    assert report.removed == []
    assert report.kept == []
    assert report.committed == [stored_url(store, "ckpt", "ckpt-1"), stored_url(store, "ckpt", "ckpt-2")]
    assert stored_files(store) == before


def test_gc_keeps_and_reports_unknown_items(store, tmp_path):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    fs = store.fs()
    put_bytes(store, b"notes", "ckpt", "README.txt", fs=fs)
    put_bytes(store, b"x", "ckpt", "drafts", "plan.txt", fs=fs)
    put_bytes(store, b"x", "ckpt", "ckpt-7", "checkpoint.weights.h5", fs=fs)
    put_bytes(store, b"\x00 not a manifest", "ckpt", "ckpt-8", MANIFEST, fs=fs)
    put_bytes(store, b"{}", "ckpt", "old.keras" + SIDECAR, fs=fs)
    put_bytes(store, b"extra", "ckpt", "ckpt-1", "extra.bin", fs=fs)
    before = stored_files(store)

    report = collect(store, "ckpt", grace_period=0)

    kept = {item.url: item.reason for item in report.kept}
    assert report.removed == []
    assert stored_files(store) == before
    assert kept == {
        stored_url(store, "ckpt", "drafts"): "not named like a checkpoint or a version",
        stored_url(store, "ckpt", "ckpt-7"): "named like a statefs unit but contains neither a claim nor a manifest",
        stored_url(store, "ckpt", "ckpt-8"): "invalid manifest (`statefs verify` names the problem)",
        stored_url(store, "ckpt", "README.txt"): "not written by statefs (no sidecar manifest)",
        stored_url(store, "ckpt", "old.keras" + SIDECAR): "a sidecar manifest whose snapshot is missing",
        stored_url(store, "ckpt", "ckpt-1", "extra.bin"): "in a committed unit but not listed in its manifest",
    }


def test_gc_keeps_snapshots_with_sidecar(store, tmp_path):
    fs = store.fs()
    put_bytes(store, b"model bytes", "snap", "digits.keras", fs=fs)
    put_bytes(store, b"{}", "snap", "digits.keras" + SIDECAR, fs=fs)

    report = collect(store, "snap", grace_period=0)

    assert report.kept == []
    assert report.committed == [stored_url(store, "snap", "digits.keras")]
    assert stored_files(store) == ["snap/digits.keras", "snap/digits.keras" + SIDECAR]


def test_gc_dry_run_removes_nothing(store, tmp_path):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    leave_fragment(store, "ckpt", "ckpt-2", age=2 * HOUR)
    before = stored_files(store)

    report = collect(store, "ckpt", dry_run=True)

    assert report.dry_run
    assert [item.url for item in report.removed] == [stored_url(store, "ckpt", "ckpt-2")]
    assert stored_files(store) == before


def test_gc_on_empty_root_finds_nothing(store):
    report = collect(store, "ckpt")

    assert (report.removed, report.kept, report.committed) == ([], [], [])


def test_gc_rejects_file_url(store):
    put_bytes(store, b"model bytes", "snap", "digits.keras")

    with pytest.raises(ValueError, match="is a file"):
        collect(store, "snap", "digits.keras")


@pytest.mark.parametrize("grace_period", [-1, float("nan"), float("inf"), "3600", True])
def test_gc_rejects_invalid_grace_period(tmp_path, grace_period):
    with pytest.raises(ValueError, match="grace_period must be a non-negative number"):
        statefs.collect_garbage(str(tmp_path), grace_period=grace_period)


# Temporary files of the local backend.


def age_file(path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_gc_removes_old_local_temporary_files(tmp_path):
    root = tmp_path / "ckpt"
    store_root = str(root)
    statefs_unit = root / "ckpt-1"
    backend, path = backends.resolve(store_root)
    local = tmp_path / "payload.bin"
    local.write_bytes(b"weights")
    writer = UnitWriter(backend, backend.join(path, "ckpt-1"), kind="checkpoint")
    with writer.claimed():
        writer.put_file(str(local), "payload.bin")
        writer.commit()
    in_unit = statefs_unit / ".statefs-manifest.json.k2x9_q7a.tmp"
    in_root = root / ".digits.keras.abcd1234.tmp"
    young = root / ".digits.h5.zzzz9999.tmp"
    for leftover in (in_unit, in_root, young):
        leftover.write_bytes(b"partial")
    age_file(in_unit, 2 * HOUR)
    age_file(in_root, 2 * HOUR)

    report = statefs.collect_garbage(store_root)

    assert sorted(item.url for item in report.removed) == sorted([f"file://{in_unit}", f"file://{in_root}"])
    assert {item.kind for item in report.removed} == {"temporary file"}
    assert [item.url for item in report.kept] == [f"file://{young}"]
    assert not in_unit.exists()
    assert not in_root.exists()
    assert young.exists()
    assert sorted(os.listdir(statefs_unit)) == [".statefs-claim", "payload.bin", MANIFEST]


# Checkpoints and versions keep working.


@pytest.fixture(scope="module")
def trained(digits):
    model = build_model()
    x, y, _, _ = digits
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    return model


def test_gc_keeps_latest_and_next_save(store, trained):
    manager = statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options)
    manager.save(trained, step=1)
    manager.save(trained, step=2)
    leave_fragment(store, "ckpt", "ckpt-3", age=2 * HOUR)
    latest = manager.latest()

    collect(store, "ckpt")

    assert manager.latest() == latest
    manager.save(trained, step=3)
    assert manager.latest().step == 3
    assert [checkpoint.step for checkpoint in manager.list()] == [1, 2, 3]


def test_gc_frees_version_number_of_fragment(store, trained):
    registry = statefs.VersionRegistry(store.url("models"), storage_options=store.storage_options)
    registry.publish(trained)
    leave_fragment(store, "models", "2", age=2 * HOUR)

    collect(store, "models")

    assert registry.latest() == 1
    assert registry.publish(trained) == 2
    assert registry.list() == [1, 2]


# The command line.


def test_cli_gc_dry_run_lists_without_removing(store, tmp_path, capsys):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    leave_fragment(store, "ckpt", "ckpt-2", age=2 * HOUR)
    put_bytes(store, b"notes", "ckpt", "README.txt")
    before = stored_files(store)

    status = main(["gc", store.url("ckpt"), "--dry-run", *option_flags(store.storage_options)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert lines == [
        f"would remove fragment {stored_url(store, 'ckpt', 'ckpt-2')} (2.0 h old)",
        f"kept file {stored_url(store, 'ckpt', 'README.txt')}: not written by statefs (no sidecar manifest)",
        f"{stored_url(store, 'ckpt')}: would remove 1, kept 1, left 1 committed item untouched",
    ]
    assert stored_files(store) == before


def test_cli_gc_zero_grace_removes_fragment(store, capsys):
    leave_fragment(store, "ckpt", "ckpt-2", age=5)

    status = main(["gc", store.url("ckpt"), "--grace-period", "0", *option_flags(store.storage_options)])

    assert status == 0
    assert capsys.readouterr().out.startswith(f"removed fragment {stored_url(store, 'ckpt', 'ckpt-2')} (")
    assert stored_files(store) == []


def test_cli_gc_json_matches_report(store, tmp_path, capsys):
    commit_unit(store, tmp_path, "ckpt", "ckpt-1")
    leave_fragment(store, "ckpt", "ckpt-2", age=60)

    status = main(["gc", store.url("ckpt"), "--json", *option_flags(store.storage_options)])

    document = json.loads(capsys.readouterr().out)
    assert status == 0
    assert document["grace_period"] == HOUR
    assert document["dry_run"] is False
    assert document["removed"] == []
    assert [item["url"] for item in document["kept"]] == [stored_url(store, "ckpt", "ckpt-2")]
    assert document["kept"][0]["kind"] == "fragment"
    assert document["committed"] == [stored_url(store, "ckpt", "ckpt-1")]


@pytest.mark.parametrize("value", ["-5", "soon", "inf"])
def test_cli_gc_rejects_invalid_grace_period(tmp_path, capsys, value):
    status = main(["gc", str(tmp_path), "--grace-period", value])

    assert status == 2
    assert "expected a non-negative number of seconds" in capsys.readouterr().err


def test_cli_gc_does_not_import_tensorflow(tmp_path, run_fresh):
    root = tmp_path / "ckpt"
    (root / "ckpt-2").mkdir(parents=True)
    (root / "ckpt-2" / CLAIM).write_text(json.dumps({"time": time.time() - 2 * HOUR}))

    output = run_fresh(
        f"""
        import json, sys
        from statefs.cli import main
        status = main(["gc", {str(root)!r}])
        print(json.dumps({{"status": status, "loaded": sorted({{"tensorflow", "keras"}} & set(sys.modules))}}))
        """
    )

    result = json.loads(output.splitlines()[-1])
    assert result == {"status": 0, "loaded": []}
    assert not (root / "ckpt-2").exists()
