"""Crash trials at scale: SIGKILL writers at random points and check what survives.

The same trials as tests/test_crash.py, with more of them. For each backend
the script starts its own emulator on 127.0.0.1 (none for local disk), then
runs checkpoint saves, version publishes and version-root migrations in
worker processes that it kills at random moments or at named pause points.
After every kill it checks that only committed units are listed and that
each one matches its manifest. After the last kill, one more operation must
complete, and its result must load back with Keras. Results go to
benchmarks/results/crash_trials.{json,md}.

    python benchmarks/crash_trials.py --trials 200 --backends file,s3,gs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))

import crash_child  # noqa: E402
from crash_child import Campaign, CrashFailure, CrashServer, Target  # noqa: E402

BUCKET = "statefs-crash-trials"
# Share of each backend's trials per operation; checkpoints get the most
# because they have the most phases (rotation, fragment removal).
SHARES = {"checkpoint": 0.4, "version": 0.3, "migrate": 0.3}


@contextlib.contextmanager
def target_for(backend: str, folder: str) -> Iterator[Target]:
    """Yield an empty root on `backend`, starting and stopping its emulator as needed."""
    if backend == "file":
        yield Target("file", os.path.join(folder, "store"), None, {})
        return
    from statefs.backends.emulators import GCSEmulator, S3Emulator

    emulator = S3Emulator() if backend == "s3" else GCSEmulator()
    emulator.start()
    try:
        emulator.create_bucket(BUCKET)
        yield Target(backend, f"{backend}://{BUCKET}/trials", emulator.storage_options(), emulator.env())
    finally:
        emulator.stop()


def split_trials(trials: int) -> dict[str, int]:
    counts = {operation: int(trials * share) for operation, share in SHARES.items()}
    counts["checkpoint"] += trials - sum(counts.values())
    return counts


def run_operation(operation: str, trials: int, target: Target, server: CrashServer, prepared: Any, seed: int) -> dict:
    """Run one campaign and return its row; a failed check ends the campaign and is recorded."""
    started = time.perf_counter()
    campaign = Campaign(operation, target, server, prepared, seed=seed)
    failure = None
    try:
        campaign.run(trials)
        campaign.finish()
        campaign.check_survivor()
    except CrashFailure as error:
        failure = str(error)
    kill_trials = [trial for trial in campaign.trials if trial.mode != "run to end"]
    killed = [trial for trial in kill_trials if trial.killed]
    return {
        "operation": operation,
        "seed": seed,
        "trials": len(kill_trials),
        "killed": len(killed),
        "paused_kills": sum(1 for trial in killed if trial.mode.startswith("pause")),
        "operations_completed": len(campaign.completed),
        "kills_by_phase": crash_child.phase_counts(campaign.trials),
        "fragments_left": None if failure else campaign.leftovers(),
        "failure": failure,
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_backend(backend: str, trials: int, prepared: Any, seed: int, folder: str) -> list[dict]:
    rows = []
    with target_for(backend, folder) as target:
        temporary = os.path.join(folder, f"worker-tmp-{backend}")
        os.makedirs(temporary)
        server = CrashServer({**target.env, "TMPDIR": temporary}, os.path.join(folder, f"server-{backend}.log"))
        try:
            for operation, count in split_trials(trials).items():
                operation_seed = seed + zlib.crc32(f"{backend}/{operation}".encode())
                row = run_operation(operation, count, target, server, prepared, operation_seed)
                row["backend"] = backend
                rows.append(row)
                print(summary_line(row), flush=True)
        finally:
            server.close()
    return rows


def summary_line(row: dict) -> str:
    phases = ", ".join(f"{phase} {count}" for phase, count in row["kills_by_phase"].items() if count)
    status = "FAILED: " + row["failure"].splitlines()[0] if row["failure"] else "ok"
    return (
        f"{row['backend']:>4} {row['operation']:<10} {row['trials']:>4} trials, {row['killed']:>4} killed "
        f"({phases}); {row['operations_completed']} operations completed, "
        f"{row['fragments_left']} fragments left, {row['seconds']} s: {status}"
    )


def write_markdown(path: str, report: dict) -> None:
    phases = list(crash_child.PHASES)
    lines = [
        f"# Crash trials ({report['trials_per_backend']} per backend, seed {report['seed']})",
        "",
        f"Machine: {report['machine']}. Script: benchmarks/crash_trials.py. Each trial starts a worker "
        "process, SIGKILLs it at a random moment or a named pause point, and checks the root it left. "
        "A kill's phase is the last protocol step the worker reported before it died.",
        "",
        "| backend | operation | trials | killed | completed operations | fragments left | failures | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['backend']} | {row['operation']} | {row['trials']} | {row['killed']} | "
            f"{row['operations_completed']} | {row['fragments_left']} | {1 if row['failure'] else 0} | {row['seconds']} |"
        )
    lines += ["", "Kills by phase:", "", "| backend | operation | " + " | ".join(phases) + " |"]
    lines.append("| --- | --- | " + " | ".join("---:" for _ in phases) + " |")
    for row in report["rows"]:
        counts = " | ".join(str(row["kills_by_phase"].get(phase, 0)) for phase in phases)
        lines.append(f"| {row['backend']} | {row['operation']} | {counts} |")
    failures = [row for row in report["rows"] if row["failure"]]
    lines += ["", f"Failures: {len(failures)}."]
    for row in failures:
        lines += ["", f"- {row['backend']} {row['operation']}:", "", "```", row["failure"], "```"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per backend, split over the three operations")
    parser.add_argument("--backends", default="file,s3,gs", help="comma-separated backends among file, s3, gs")
    parser.add_argument("--seed", type=int, default=20240611, help="seed of the random kill delays")
    parser.add_argument("--output", default=RESULTS, help="folder for crash_trials.json and crash_trials.md")
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(backends) - {"file", "s3", "gs"})
    if unknown:
        parser.error(f"unknown backends {unknown}; expected file, s3 or gs")

    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="statefs-crash-trials-") as folder:
        prepared = crash_child.prepare_files(os.path.join(folder, "prepared"))
        for backend in backends:
            rows += run_backend(backend, args.trials, prepared, args.seed, folder)

    report = {
        "trials_per_backend": args.trials,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "crash_trials.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    write_markdown(os.path.join(args.output, "crash_trials.md"), report)
    failures = sum(1 for row in rows if row["failure"])
    print(f"{sum(row['trials'] for row in rows)} trials in {report['seconds']} s, {failures} failed campaigns")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
