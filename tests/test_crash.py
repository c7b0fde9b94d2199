"""Writers killed with SIGKILL leave only committed units behind.

A worker process saves checkpoints, publishes versions or migrates a version
root in a loop. It is killed at a random moment or at a named pause point:
between payload and manifest, inside a multipart upload, or between the two
deletes of rotation. After every kill the root is checked. Only committed
units may be listed, each must match its manifest, and the latest must be
at least as new as every operation that returned. The next worker must
carry on from what the killed one left. Workers come from a fork server
(`tests/crash_child.py`) that has imported statefs, s3fs and gcsfs once and
never imports TensorFlow. The parent restores what survives with Keras.

`STATEFS_CRASH_SEED` sets the seed of the random kill delays; every failure
message names the seed it ran with.
"""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest

import crash_child
import statefs
from crash_child import Campaign, CrashServer, Target

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("STATEFS_CRASH_SEED", "20240611"))
# 50 trials per backend in all.
TRIALS = {"checkpoint": 20, "version": 15, "migrate": 15}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Files prepared from real Keras models, which the workers use instead of serializing a model."""
    return crash_child.prepare_files(str(tmp_path_factory.mktemp("prepared")))


@pytest.fixture(scope="module")
def crash_servers(tmp_path_factory):
    """Start one fork server per backend, on first use, and stop them all after the module."""
    servers: dict[str, CrashServer] = {}
    scratch = tmp_path_factory.mktemp("crash")

    def server_for(store) -> CrashServer:
        if store.backend not in servers:
            # Staging folders of killed workers land here, not in /tmp.
            temporary = scratch / f"tmp-{store.backend}"
            temporary.mkdir()
            env = {**store.env, "TMPDIR": str(temporary)}
            servers[store.backend] = CrashServer(env, str(scratch / f"server-{store.backend}.log"))
        return servers[store.backend]

    yield server_for
    for server in servers.values():
        server.close()
    # A killed worker never removes its staging folder; a campaign leaves hundreds of MB there.
    for temporary in scratch.glob("tmp-*"):
        shutil.rmtree(temporary)


def campaign_for(operation, shared_store, crash_servers, prepared) -> Campaign:
    target = Target(shared_store.backend, shared_store.root, shared_store.storage_options, shared_store.env)
    seed = SEED + zlib.crc32(f"{shared_store.backend}/{operation}".encode())
    return Campaign(operation, target, crash_servers(shared_store), prepared, seed=seed)


def assert_phases_hit(campaign: Campaign, expected: set[str]) -> None:
    hit = {phase for phase, count in crash_child.phase_counts(campaign.trials).items() if count}
    assert expected <= hit, f"kills never landed in {sorted(expected - hit)} (seed={campaign.seed}); hit: {sorted(hit)}"


def weights_equal(first, second) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


def test_killed_saves_keep_restorable_latest(shared_store, crash_servers, prepared):
    campaign = campaign_for("checkpoint", shared_store, crash_servers, prepared)

    campaign.run(TRIALS["checkpoint"])
    final = campaign.finish()

    assert_phases_hit(campaign, {"before-manifest", "payload-part", "after-commit", "rotation"})
    manager = statefs.CheckpointManager(campaign.url, storage_options=shared_store.storage_options)
    assert manager.latest().step == final.done()[0]
    restored = crash_child.wide_model()
    manager.restore(restored)
    assert weights_equal(restored, prepared.wide)
    assert int(restored.optimizer.iterations.numpy()) == int(prepared.wide.optimizer.iterations.numpy())


def test_killed_publishes_list_committed_versions(shared_store, crash_servers, prepared):
    campaign = campaign_for("version", shared_store, crash_servers, prepared)

    campaign.run(TRIALS["version"])
    final = campaign.finish()

    assert_phases_hit(campaign, {"before-manifest", "payload"})
    registry = statefs.VersionRegistry(campaign.url, storage_options=shared_store.storage_options)
    assert registry.latest() == final.done()[0]
    loaded = registry.load()
    assert np.array_equal(loaded.predict(prepared.inputs, verbose=0), prepared.small.predict(prepared.inputs, verbose=0))


def test_killed_migrations_rerun_to_completion(shared_store, crash_servers, prepared):
    campaign = campaign_for("migrate", shared_store, crash_servers, prepared)

    campaign.run(TRIALS["migrate"])
    final = campaign.finish()

    assert_phases_hit(campaign, {"before-manifest", "payload"})
    # A rerun onto the fragment of a killed migration raises UnitExistsError,
    # because nothing shows that the writer is gone. The worker then removes
    # the fragment with remove_fragment, the remedy the error message gives,
    # and reruns. The campaign fails unless that migration completes.
    rejections = [event for trial in campaign.trials for event in trial.events if event["event"] == "rejected"]
    if shared_store.backend == "gs":
        # gcp-storage-emulator ignores ifGenerationMatch=0, so a rerun
        # overwrites the fragment's claim instead of finding it; real GCS
        # rejects the claim as S3 and local disk do.
        assert rejections == []
    else:
        assert rejections, f"no rerun met the fragment of a killed migration (seed={campaign.seed})"
        assert all("unfinished write" in event["message"] for event in rejections)
    copy = f"{campaign.url}/copy-{final.done()[0]}"
    registry = statefs.VersionRegistry(copy, storage_options=shared_store.storage_options)
    assert registry.list() == [1, 2]
    loaded = registry.load(2)
    assert np.array_equal(loaded.predict(prepared.inputs, verbose=0), prepared.small.predict(prepared.inputs, verbose=0))
