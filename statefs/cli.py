"""The `statefs` command: migrate, ls, verify, gc, demo.

Store settings come from fsspec's environment variables
(`FSSPEC_S3_ENDPOINT_URL`, `FSSPEC_GCS_TOKEN`, ...) or from repeated
`--option KEY=VALUE` flags, so the command needs no flag per store.
Listing, verify and gc never import TensorFlow; only `demo` does, when it
trains.

Exit status: 0 on success; 1 when `verify` finds a problem, and for any
error a user can fix (wrong URL, missing package, unreachable store), which
is printed as one `statefs: error:` line on stderr; 2 for invalid command
line usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import statefs
from statefs import backends
from statefs.backends import Backend
from statefs.checkpoints import CHECKPOINT_NAME
from statefs.checksums import copy_stream
from statefs.commit import committed_manifest_or_none, list_children, read_manifest
from statefs.errors import ManifestError
from statefs.gc import DEFAULT_GRACE_PERIOD, GarbageItem, collect_garbage
from statefs.integrity import VerificationReport, verify
from statefs.manifest import Manifest
from statefs.snapshots import SIDECAR_SUFFIX, read_sidecar
from statefs.versions import VERSION_NAME


# Failures a user can cause and fix: a wrong URL, a missing package, an
# unreachable store, a unit that exists. They get one line, not a traceback.
EXPECTED_ERRORS = (OSError, ValueError, ImportError)
KIB = 1024
CHECKPOINT_COLUMNS = ("step", "epoch", "batch", "KiB", "created", "metrics")
VERSION_COLUMNS = ("version", "files", "KiB", "created", "metadata")
SNAPSHOT_COLUMNS = ("file", "KiB", "crc32c")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: `sys.argv[1:]`) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        # argparse exits after --help, --version and usage errors, and has printed the message.
        return exit.code if isinstance(exit.code, int) else 1
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s: %(levelname)s: %(message)s",
    )
    try:
        return args.run(args)
    except EXPECTED_ERRORS as error:
        print(f"statefs: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("statefs: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statefs",
        description="Keep Keras/TensorFlow model state at fsspec URLs and move it between stores.",
    )
    parser.add_argument("--version", action="version", version=f"statefs {statefs.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each commit, deletion and copy")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate",
        help="copy a snapshot, a version, a version root or a checkpoint root to another URL",
        description="Copy model state from SRC to DST, verify the copy and commit it at DST.",
    )
    migrate.add_argument("src", metavar="SRC", help="URL or local path to copy from")
    migrate.add_argument("dst", metavar="DST", help="URL or local path to copy to")
    _add_option_flag(migrate, "--src-option", "src_options", "fsspec storage option for SRC")
    _add_option_flag(migrate, "--dst-option", "dst_options", "fsspec storage option for DST")
    migrate.set_defaults(run=run_migrate)

    ls = commands.add_parser(
        "ls",
        help="list committed checkpoints or versions under a root, or show a snapshot",
        description="List the committed checkpoints or versions under URL, or show one unit or snapshot.",
    )
    ls.add_argument("url", metavar="URL", help="a checkpoint or version root, one unit, or a snapshot file")
    _add_option_flag(ls, "--option", "options", "fsspec storage option for URL")
    ls.set_defaults(run=run_ls)

    verify_command = commands.add_parser(
        "verify",
        help="check stored checkpoints, versions or snapshots against their manifests",
        description=(
            "Check every file under URL against the size and CRC32C its manifest records, without "
            "downloading it to disk. Prints one line per problem and exits with 1 if there is any."
        ),
    )
    verify_command.add_argument(
        "url", metavar="URL", help="a checkpoint or version root, one unit, a folder of snapshots, or a snapshot file"
    )
    verify_command.add_argument("--json", action="store_true", help="print the report as one JSON document")
    _add_option_flag(verify_command, "--option", "options", "fsspec storage option for URL")
    verify_command.set_defaults(run=run_verify)

    gc = commands.add_parser(
        "gc",
        help="remove leftovers of interrupted writes (claims without a manifest, temporary files)",
        description=(
            "Remove fragments (a ckpt-N or N folder with a claim but no manifest) and temporary files of "
            "interrupted local writes under URL, once they are older than the grace period. Committed "
            "units are never touched; anything gc cannot classify is listed and kept."
        ),
    )
    gc.add_argument("url", metavar="URL", help="a checkpoint or version root, or one unit")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, and remove nothing")
    gc.add_argument(
        "--grace-period",
        type=_non_negative_seconds,
        default=DEFAULT_GRACE_PERIOD,
        metavar="SECONDS",
        help="minimum age in seconds of what is removed, because a younger fragment may belong to a "
        f"write still in progress (default: {DEFAULT_GRACE_PERIOD:.0f})",
    )
    gc.add_argument("--json", action="store_true", help="print the report as one JSON document")
    _add_option_flag(gc, "--option", "options", "fsspec storage option for URL")
    gc.set_defaults(run=run_gc)

    demo = commands.add_parser(
        "demo",
        help="train a digits classifier, store and migrate its state, and reload every copy",
        description=(
            "Train a small Keras classifier on scikit-learn's digits, keep checkpoints, versions and a "
            "snapshot, migrate them, reload every copy in a fresh process and compare test accuracy."
        ),
    )
    demo.add_argument(
        "--storage",
        choices=("servers", "file"),
        default="servers",
        help="'servers' starts S3 and GCS emulators on 127.0.0.1; 'file' uses local folders only "
        "(default: servers)",
    )
    demo.add_argument(
        "--workdir",
        metavar="DIR",
        help="empty or new folder for local copies (default: a temporary folder, removed at the end)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=5,
        metavar="N",
        help="epochs before version 1; version 2 follows after N more (default: 5)",
    )
    demo.set_defaults(run=run_demo)
    return parser


def run_migrate(args: argparse.Namespace) -> int:
    report = statefs.migrate(
        args.src,
        args.dst,
        src_storage_options=_options_dict(args.src_options),
        dst_storage_options=_options_dict(args.dst_options),
    )
    for item in report.items:
        print(
            f"{item.action} {item.kind} {item.source} → {item.destination}: "
            f"{_count(item.files, 'file')}, {item.bytes} bytes, {item.seconds:.2f} s"
        )
    for skipped in report.skipped:
        print(f"skipped {skipped}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    backend, path = backends.resolve(args.url, _options_dict(args.options))
    backend.check(path)
    if _is_file(backend, path):
        lines = _describe_file(backend, path)
    else:
        manifest = read_manifest(backend, path)
        lines = _describe_root(backend, path) if manifest is None else _describe_unit(backend, path, manifest)
    for line in lines:
        print(line)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    report = verify(args.url, storage_options=_options_dict(args.options))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for line in _verification_lines(report):
            print(line)
    return 0 if report.ok else 1


def _verification_lines(report: VerificationReport) -> list[str]:
    lines = [str(problem) for problem in report.problems]
    lines.extend(f"note: {note}" for note in report.notes)
    checked = (
        f"{_count(len(report.units), 'unit')}, {_count(len(report.snapshots), 'snapshot')}, "
        f"{_count(report.files, 'file')}, {report.bytes} bytes"
    )
    if report.ok:
        lines.append(f"OK {report.url}: verified {checked}")
    else:
        lines.append(f"FAILED {report.url}: {_count(len(report.problems), 'problem')} in {checked}")
    return lines


def run_gc(args: argparse.Namespace) -> int:
    report = collect_garbage(
        args.url,
        grace_period=args.grace_period,
        dry_run=args.dry_run,
        storage_options=_options_dict(args.options),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    action = "would remove" if report.dry_run else "removed"
    for item in report.removed:
        print(f"{action} {item.kind} {item.url} ({_describe_age(item)})")
    for item in report.kept:
        age = f", {_describe_age(item)}" if item.age is not None else ""
        print(f"kept {item.kind} {item.url}: {item.reason}{age}")
    print(
        f"{report.url}: {action} {len(report.removed)}, kept {len(report.kept)}, "
        f"left {_count(len(report.committed), 'committed item')} untouched"
    )
    return 0


def _describe_age(item: GarbageItem) -> str:
    if item.age is None:
        return "age unknown"
    if item.age >= 3600:
        return f"{item.age / 3600:.1f} h old"
    if item.age >= 60:
        return f"{item.age / 60:.0f} min old"
    return f"{max(item.age, 0):.0f} s old"


def run_demo(args: argparse.Namespace) -> int:
    from statefs.demo import run_demo as demo

    return demo(storage=args.storage, workdir=args.workdir, epochs=args.epochs)


def _is_file(backend: Backend, path: str) -> bool:
    try:
        return backend.info(path).get("type") == "file"
    except FileNotFoundError:
        return False


def _describe_file(backend: Backend, path: str) -> list[str]:
    """Return the size and CRC32C of one file, as recorded in its sidecar manifest or as read now."""
    size = backend.info(path)["size"]
    recorded = None if path.endswith(SIDECAR_SUFFIX) else read_sidecar(backend, path)
    if recorded is None:
        with backend.open_read(path) as reader:
            checksum = copy_stream(reader).crc32c
        source = "computed now; no sidecar manifest"
    else:
        checksum = recorded.crc32c
        source = f"recorded in {path.rstrip('/').rsplit('/', 1)[-1]}{SIDECAR_SUFFIX}"
        if recorded.size != size:
            source += f", which records {recorded.size} bytes"
    return [
        backend.url(path),
        f"  size    {size} bytes ({_kib(size)} KiB)",
        f"  crc32c  {checksum} ({source})",
    ]


def _describe_unit(backend: Backend, path: str, manifest: Manifest) -> list[str]:
    """Return the kind, metadata and files of one committed unit."""
    lines = [
        f"{backend.url(path)}: committed {manifest.kind}, {_count(len(manifest.files), 'file')}, "
        f"{manifest.total_size()} bytes ({_kib(manifest.total_size())} KiB), created {manifest.created}",
    ]
    if manifest.metadata:
        lines.append(f"  metadata  {json.dumps(manifest.metadata, sort_keys=True)}")
    rows = [(name, digest.size, digest.crc32c) for name, digest in sorted(manifest.files.items())]
    lines.extend("  " + line for line in format_table(("file", "bytes", "crc32c"), rows))
    return lines


def _describe_root(backend: Backend, path: str) -> list[str]:
    """Return tables of the committed checkpoints, the committed versions and the snapshots in a folder."""
    checkpoints, versions, uncommitted = [], [], []
    for number, name, child in _numbered_children(backend, path):
        manifest = committed_manifest_or_none(backend, child)
        if manifest is None:
            uncommitted.append(name)
        elif manifest.kind == "checkpoint":
            checkpoints.append((number, manifest))
        elif manifest.kind == "version":
            versions.append((number, manifest))

    url = backend.url(path)
    snapshots = _snapshot_rows(backend, path)
    lines = [] if checkpoints or versions or snapshots else [f"{url}: no committed checkpoints, versions or snapshots"]
    if checkpoints:
        lines.append(f"{url}: {_count(len(checkpoints), 'committed checkpoint')}")
        lines.extend("  " + line for line in format_table(CHECKPOINT_COLUMNS, [_checkpoint_row(n, m) for n, m in checkpoints]))
    if versions:
        lines.append(f"{url}: {_count(len(versions), 'committed version')}")
        lines.extend("  " + line for line in format_table(VERSION_COLUMNS, [_version_row(n, m) for n, m in versions]))
    if uncommitted:
        lines.append(f"  not committed (no manifest): {', '.join(uncommitted)}")
    if snapshots:
        lines.append(f"{url}: {_count(len(snapshots), 'snapshot')}")
        lines.extend("  " + line for line in format_table(SNAPSHOT_COLUMNS, snapshots))
    return lines


def _snapshot_rows(backend: Backend, path: str) -> list[tuple[Any, ...]]:
    """Return (name, KiB, crc32c) of each file in `path` that has a sidecar manifest."""
    files = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in backend.list_dir(path) if info.get("type") == "file"}
    rows = []
    for name in sorted(files):
        if name.endswith(SIDECAR_SUFFIX) or name + SIDECAR_SUFFIX not in files:
            continue
        try:
            recorded = read_sidecar(backend, backend.join(path, name))
        except ManifestError:
            rows.append((name, _kib(files[name]["size"]), "invalid sidecar manifest"))
            continue
        rows.append((name, _kib(files[name]["size"]), recorded.crc32c if recorded else "-"))
    return rows


def _numbered_children(backend: Backend, path: str) -> list[tuple[int, str, str]]:
    """Return (number, name, path) of the child folders named like a checkpoint or a version, by number."""
    found = []
    for name, child in list_children(backend, path).items():
        checkpoint = CHECKPOINT_NAME.match(name)
        if checkpoint:
            found.append((int(checkpoint.group(1)), name, child))
        elif VERSION_NAME.match(name):
            found.append((int(name), name, child))
    return sorted(found)


def _checkpoint_row(step: int, manifest: Manifest) -> tuple[Any, ...]:
    epoch = manifest.metadata.get("epoch")
    batch = manifest.metadata.get("batch")
    metrics = manifest.metadata.get("metrics") or {}
    return (
        step,
        "-" if epoch is None else epoch,
        "-" if batch is None else batch,
        _kib(manifest.total_size()),
        manifest.created,
        " ".join(f"{name}={_short(value)}" for name, value in sorted(metrics.items())),
    )


def _version_row(number: int, manifest: Manifest) -> tuple[Any, ...]:
    # publish() stores the number in the metadata too; the first column shows it.
    metadata = {key: value for key, value in manifest.metadata.items() if key != "version"}
    return (
        number,
        len(manifest.files),
        _kib(manifest.total_size()),
        manifest.created,
        " ".join(f"{key}={_short(value)}" for key, value in sorted(metadata.items())),
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Return the lines of a plain-text table; numbers are right-aligned, text left-aligned."""
    cells = [[str(value) for value in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric)
        ]
        return "  ".join(padded).rstrip()

    return [line(headers)] + [line(row) for row in cells]


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _kib(size: int) -> float:
    return round(size / KIB, 1)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if not isinstance(value, str) else value


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def parse_option(text: str) -> tuple[str, Any]:
    """Split `KEY=VALUE` and parse VALUE as JSON, keeping it as a string when it is not valid JSON."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, such as endpoint_url=http://127.0.0.1:9000. Received: {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_option_flag(parser: argparse.ArgumentParser, flag: str, dest: str, what: str) -> None:
    parser.add_argument(
        flag,
        dest=dest,
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{what}, read as JSON if VALUE parses, else as a string (repeat for more options)",
    )


def _options_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any] | None:
    return dict(pairs) or None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer. Received: {text!r}")
    return value


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds. Received: {text!r}")
    return value


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
