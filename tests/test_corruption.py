"""Damaged state is caught by `statefs verify` and by every public load.

Each case damages the stored bytes of one artefact from outside statefs,
through a new fsspec filesystem instance. `statefs verify --json` must then
exit with 1 and name the damaged file. The load (`CheckpointManager.restore`,
`VersionRegistry.load`, `load_snapshot`) must raise IntegrityError,
ManifestError or FileNotFoundError naming the file and, for a checksum or
size, the expected and found values. Neither may write anything outside a
staging folder, which is gone afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

import pytest

import statefs
from conftest import build_model
from statefs.checksums import digest_bytes
from statefs.cli import main
from test_verify import option_flags, put_bytes, saved_state, stored_url, upload_state  # noqa: F401

MANIFEST = "statefs-manifest.json"
SIDECAR = ".statefs-manifest.json"


@dataclasses.dataclass(frozen=True)
class Artefact:
    """Where one kind of saved state keeps its payload file and manifest under the store's root."""

    root: str
    target: tuple[str, ...]
    payload: tuple[str, ...]
    manifest: tuple[str, ...]

    def load(self, store):
        if self.root == "ckpt":
            manager = statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options)
            return manager.restore(build_model(), step=2)
        if self.root == "models":
            return statefs.VersionRegistry(store.url("models"), storage_options=store.storage_options).load(1)
        return statefs.load_snapshot(store.url(*self.target), storage_options=store.storage_options)


ARTEFACTS = {
    "checkpoint": Artefact(
        "ckpt", ("ckpt", "ckpt-2"), ("ckpt", "ckpt-2", "state.bin"), ("ckpt", "ckpt-2", MANIFEST)
    ),
    # VersionRegistry.load reads only model.keras, and verify covers the SavedModel files too.
    "version": Artefact("models", ("models", "1"), ("models", "1", "model.keras"), ("models", "1", MANIFEST)),
    "snapshot": Artefact(
        "snap", ("snap", "digits.keras"), ("snap", "digits.keras"), ("snap", "digits.keras" + SIDECAR)
    ),
}


@dataclasses.dataclass(frozen=True)
class Damage:
    """What a corruption left: the problem kind verify reports, and the values a load must name."""

    kind: str
    url: str
    error: type[BaseException]
    expected: object = None
    found: object = None
    mentions: tuple[str, ...] = ()


def flip_byte(store, artefact: Artefact, outside) -> Damage:
    fs = store.fs()
    before = fs.cat_file(store.path(*artefact.payload))
    after = bytearray(before)
    after[len(after) // 2] ^= 0x01
    fs.pipe_file(store.path(*artefact.payload), bytes(after))
    return Damage(
        "checksum-mismatch",
        stored_url(store, *artefact.payload),
        statefs.IntegrityError,
        expected=digest_bytes(before).crc32c,
        found=digest_bytes(bytes(after)).crc32c,
    )


def truncate(store, artefact: Artefact, outside) -> Damage:
    fs = store.fs()
    before = fs.cat_file(store.path(*artefact.payload))
    fs.pipe_file(store.path(*artefact.payload), before[: len(before) // 2])
    return Damage(
        "size-mismatch",
        stored_url(store, *artefact.payload),
        statefs.IntegrityError,
        expected=len(before),
        found=len(before) // 2,
    )


def remove_payload(store, artefact: Artefact, outside) -> Damage:
    store.fs().rm_file(store.path(*artefact.payload))
    return Damage("missing-file", stored_url(store, *artefact.payload), FileNotFoundError)


def garble_manifest(store, artefact: Artefact, outside=None) -> Damage:
    store.fs().pipe_file(store.path(*artefact.manifest), b"\x00{ not a manifest")
    return Damage(
        "invalid-manifest", stored_url(store, *artefact.manifest), statefs.ManifestError, mentions=("not JSON",)
    )


def rename_entry(store, artefact: Artefact, entry: str) -> Damage:
    """Rewrite the manifest so that the payload's entry is `entry`, keeping its size and checksum."""
    fs = store.fs()
    document = json.loads(fs.cat_file(store.path(*artefact.manifest)))
    document["files"][entry] = document["files"].pop(artefact.payload[-1])
    fs.pipe_file(store.path(*artefact.manifest), json.dumps(document).encode())
    return Damage("unsafe-path", stored_url(store, *artefact.manifest), statefs.ManifestError, found=entry, mentions=(entry,))


def parent_entry(store, artefact: Artefact, outside) -> Damage:
    return rename_entry(store, artefact, "../" + artefact.payload[-1])


def absolute_entry(store, artefact: Artefact, outside) -> Damage:
    """Point the payload's entry at a local folder outside every staging folder."""
    return rename_entry(store, artefact, str(outside / artefact.payload[-1]))


CORRUPTIONS = {
    "flipped-byte": flip_byte,
    "truncated": truncate,
    "missing-payload": remove_payload,
    "garbage-manifest": garble_manifest,
    "parent-path-entry": parent_entry,
    "absolute-path-entry": absolute_entry,
}
CASES = [(artefact, corruption) for artefact in ARTEFACTS for corruption in CORRUPTIONS]
CASE_IDS = [f"{artefact}-{corruption}" for artefact, corruption in CASES]


def damage(store, saved_state, outside, artefact_name: str, corruption: str) -> tuple[Artefact, Damage]:
    """Upload one artefact and damage it. Absolute manifest entries point into the local folder `outside`."""
    artefact = ARTEFACTS[artefact_name]
    upload_state(store, saved_state, artefact.root)
    return artefact, CORRUPTIONS[corruption](store, artefact, outside)


def tree(folder) -> dict[str, bytes]:
    """Return {relative path: bytes} of every file under a local folder."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def stored_tree(store) -> dict[str, bytes]:
    fs = store.fs()
    return {name: fs.cat_file(name) for name in fs.find(store.path())}


@pytest.fixture
def isolated_local_disk(tmp_path, monkeypatch):
    """Send staging to a private temporary folder, work from an empty folder, and return both."""
    staging = tmp_path / "staging"
    working = tmp_path / "working"
    staging.mkdir()
    working.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    monkeypatch.chdir(working)
    return staging, working


@pytest.mark.parametrize(("artefact_name", "corruption"), CASES, ids=CASE_IDS)
def test_damage_caught_by_verify_and_load(store, saved_state, tmp_path, isolated_local_disk, capsys, artefact_name, corruption):
    staging, working = isolated_local_disk
    outside = tmp_path / "outside"
    artefact, found = damage(store, saved_state, outside, artefact_name, corruption)
    stored_before = stored_tree(store)

    status = main(["verify", store.url(artefact.root), "--json", *option_flags(store.storage_options)])

    document = json.loads(capsys.readouterr().out)
    assert status == 1
    assert document["ok"] is False
    assert len(document["problems"]) == 1
    problem = document["problems"][0]
    assert problem["kind"] == found.kind
    assert problem["url"] == found.url
    assert problem["expected"] == found.expected
    assert problem["found"] == found.found

    with pytest.raises(found.error) as raised:
        artefact.load(store)

    message = str(raised.value)
    assert found.url.rsplit("/", 1)[-1] in message
    if found.error is statefs.IntegrityError:
        assert raised.value.url == found.url
        assert (raised.value.expected, raised.value.found) == (found.expected, found.found)
        assert repr(found.expected) in message
        assert repr(found.found) in message
    for text in found.mentions:
        assert text in message

    # Neither verify nor the failed load may write outside a staging folder,
    # and that folder must be gone. So no stored object changed, no file
    # appeared beside staging, and nothing exists where an unsafe entry points.
    assert stored_tree(store) == stored_before
    assert tree(staging) == {}
    assert tree(working) == {}
    assert not outside.exists()
    assert not (tmp_path / artefact.payload[-1]).exists()


def test_restore_latest_skips_invalid_manifest(store, saved_state, caplog):
    upload_state(store, saved_state, "ckpt")
    garble_manifest(store, ARTEFACTS["checkpoint"])
    manager = statefs.CheckpointManager(store.url("ckpt"), storage_options=store.storage_options)

    with caplog.at_level(logging.WARNING, logger="statefs.commit"):
        restored = manager.restore(build_model())

    assert restored.step == 1
    assert any(stored_url(store, "ckpt", "ckpt-2") in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("artefact_name", list(ARTEFACTS))
def test_successful_load_writes_only_staging(store, saved_state, isolated_local_disk, artefact_name):
    staging, working = isolated_local_disk
    artefact = ARTEFACTS[artefact_name]
    upload_state(store, saved_state, artefact.root)
    before = stored_tree(store)

    artefact.load(store)

    assert stored_tree(store) == before
    assert tree(staging) == {}
    assert tree(working) == {}


def test_version_manifest_without_keras_file_raises(store, saved_state):
    upload_state(store, saved_state, "models")
    fs = store.fs()
    manifest_path = store.path("models", "1", MANIFEST)
    document = json.loads(fs.cat_file(manifest_path))
    del document["files"]["model.keras"]
    fs.pipe_file(manifest_path, json.dumps(document).encode())
    registry = statefs.VersionRegistry(store.url("models"), storage_options=store.storage_options)

    with pytest.raises(statefs.ManifestError, match="lists no model.keras") as raised:
        registry.load(1)

    assert stored_url(store, "models", "1", MANIFEST) in str(raised.value)
