"""Side-by-side timings: what checksums cost, and migration against a plain copy.

Each row runs the baseline and statefs on the same model in this process,
alternating, and reports the ratio of their median times. The checksum row
compares statefs with itself, its CRC32C replaced by a hasher that does
nothing, so the ratio is the cost of computing checksums during a save.
Checkpoint saves and restores against Keras, and async saves, are in
bench_checkpoints.py. Results go to benchmarks/results/save_load.{json,md,png}.

    python benchmarks/bench_save_load.py --params 40_000_000 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_model(params: int):
    """Return a compiled MLP of about `params` weights whose Adam state is built."""
    import keras
    import numpy as np

    width = int((params / 3) ** 0.5)
    model = keras.Sequential(
        [keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(width), keras.layers.Dense(width)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.zeros((8, width), dtype="float32")
    model.fit(x, x, epochs=1, verbose=0)
    return model


class NoChecksum:
    """A stand-in for statefs's CRC32C that hashes nothing, to measure what hashing costs."""

    def update(self, data: bytes) -> None:
        pass

    def value(self) -> str:
        return ""


@contextlib.contextmanager
def checksums_off():
    """Replace CRC32C in every statefs module that hashes while writing."""
    import statefs.checksums
    import statefs.commit

    modules = (statefs.checksums, statefs.commit)
    originals = [module.Crc32c for module in modules]
    for module in modules:
        module.Crc32c = NoChecksum
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.Crc32c = original


def median_seconds(action: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def compare(name: str, baseline: Callable[[], None], candidate: Callable[[], None], repeats: int) -> dict:
    """Time both, interleaved after one warm-up each, and return the row."""
    baseline()
    candidate()
    baseline_times, candidate_times = [], []
    for _ in range(repeats):
        baseline_times += median_seconds(baseline, 1)
        candidate_times += median_seconds(candidate, 1)
    base, cand = statistics.median(baseline_times), statistics.median(candidate_times)
    row = {"benchmark": name, "baseline_s": base, "statefs_s": cand, "ratio": cand / base}
    print(f"{name:55s} baseline {base:7.3f} s  statefs {cand:7.3f} s  ratio {cand / base:5.2f}", flush=True)
    return row


def run(params: int, repeats: int, with_servers: bool) -> list[dict]:
    import fsspec

    import statefs

    model = build_model(params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="statefs-bench-") as folder:
        weights = os.path.join(folder, "keras.weights.h5")
        model.save_weights(weights)
        manager = statefs.CheckpointManager(os.path.join(folder, "ckpt"), max_to_keep=1)
        unhashed = statefs.CheckpointManager(os.path.join(folder, "unhashed"), max_to_keep=1)
        step = iter(range(10**6))

        def save_without_checksums() -> None:
            with checksums_off():
                unhashed.save(model, step=next(step))

        rows.append(compare(
            "checkpoint save, local: statefs without vs with CRC32C",
            save_without_checksums,
            lambda: manager.save(model, step=next(step)),
            repeats,
        ))
        if not with_servers:
            return rows

        from statefs.backends.emulators import GCSEmulator, S3Emulator

        with S3Emulator() as s3, GCSEmulator() as gcs:
            s3.create_bucket("bench")
            gcs.create_bucket("bench")
            s3_fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options())
            gcs_fs = fsspec.filesystem("gs", skip_instance_cache=True, **gcs.storage_options())
            s3_fs.put_file(weights, "bench/source.weights.h5")
            statefs.save_snapshot(model, "s3://bench/snap.weights.h5", storage_options=s3.storage_options())
            copies = iter(range(10**6))

            def plain_copy() -> None:
                with s3_fs.open("bench/source.weights.h5", "rb") as source, gcs_fs.open(f"bench/plain-{next(copies)}.weights.h5", "wb") as target:
                    while chunk := source.read(8 * 2**20):
                        target.write(chunk)

            rows.append(compare(
                "snapshot migration s3 -> gs: fsspec stream copy vs statefs.migrate (verified)",
                plain_copy,
                lambda: statefs.migrate(
                    "s3://bench/snap.weights.h5",
                    f"gs://bench/migrated-{next(copies)}.weights.h5",
                    src_storage_options=s3.storage_options(),
                    dst_storage_options=gcs.storage_options(),
                ),
                repeats,
            ))
    return rows


def write_results(rows: list[dict], params: int) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    document = {
        "params": params,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rows": rows,
    }
    with open(os.path.join(RESULTS, "save_load.json"), "w") as handle:
        json.dump(document, handle, indent=2)
    lines = [
        f"# Save and load against plain Keras and fsspec ({params:,} parameters, Adam)",
        "",
        f"Machine: {document['machine']}. Median of interleaved runs; ratio = statefs / baseline.",
        "",
        "| benchmark | baseline (s) | statefs (s) | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['benchmark']} | {r['baseline_s']:.3f} | {r['statefs_s']:.3f} | {r['ratio']:.2f} |" for r in rows]
    with open(os.path.join(RESULTS, "save_load.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the PNG (pip install matplotlib)", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(8, 1 + 0.8 * len(rows)))
    labels = [row["benchmark"].split(":")[0] for row in rows]
    axis.barh(labels, [row["ratio"] for row in rows], color="#4c72b0")
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set_xlabel("statefs time / baseline time (lower is better, 1.0 = same)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, "save_load.png"), dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=40_000_000, help="model size in weights (default 40M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--no-servers", action="store_true", help="skip the S3/GCS rows")
    args = parser.parse_args()
    rows = run(args.params, args.repeats, not args.no_servers)
    write_results(rows, args.params)


if __name__ == "__main__":
    main()
