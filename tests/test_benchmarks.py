"""The benchmark scripts run end to end on a tiny model and write their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_bench_checkpoints_writes_expected_rows(tmp_path):
    command = [
        sys.executable, os.path.join(BENCHMARKS, "bench_checkpoints.py"),
        "--params", "200000", "--repeats", "2", "--no-servers", "--results", str(tmp_path),
    ]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(tmp_path / "checkpoints.json") as handle:
        document = json.load(handle)
    assert [row["name"] for row in document["rows"]] == [
        "async_stall_file",
        "training_during_async_save_file",
        "save_file_vs_keras_save_weights",
        "restore_file_vs_keras_load_weights",
    ]
    assert (tmp_path / "checkpoints.md").exists()
