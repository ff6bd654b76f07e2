"""Benchmark of DICOM ingest: images/s of the node's Storage SCP (``radnet-node serve``) receiving a
series from DCMTK ``storescu``, against DCMTK ``storescp`` receiving the same files in the same run.

Run ``python benchmarks/bench_ingest.py [--slices 200] [--size 512] [--repeats 16] [--json F]``.
It writes a synthetic head CT (default 200 slices of 512 x 512, uncompressed, ~100 MB) and sends it
on one association with ``storescu -pdu 131072``, ``TCP_NODELAY=1`` in every DCMTK environment
(Debian's DCMTK stalls on Nagle's algorithm without it), to

- ``storescp -pdu 131072 +B`` writing every file to disk (the reference),
- ``radnet-node serve`` (``quiet_seconds`` of a day so no job runs;
  the model is a tiny one because ingest never touches it), which puts each instance in its place
  in the spool before it answers, its C-STOREs received by the C loop (``radnet_node/_fastscp.c``),
- the same with the Python loop alone (``RADNET_NODE_INGEST_LOOP=python``), and
- the same with ``[node] fsync_spool = true`` (every file and folder fsynced before the answer;
  the Python loop receives then too).

The four receivers are started once and stay up, as servers do; each round sends one new series
(its own UIDs, so nothing is a duplicate) to each of them, the rounds taking the receivers in
rotated orders, forwards and backwards (16 rounds: each receiver four times in each place), each
send after ``sync``. Nothing is deleted until the end. The median wall
time of ``storescu`` from start to exit gives images/s, and the ratio node / DCMTK is printed
(target: >= 1), with the median of the per-round ratios and a 90 % bootstrap interval of the ratio
(the rounds resampled, 10,000 times): on this VM whole runs of either receiver are sometimes 2-3
times slower than the next, so a single ratio means little without it. Every run's instances are
counted right after it. A second table gives the CPU time per instance of each receiver (user
and system, from ``/proc``, its ended threads included, so the catalog commit and the
association's bookkeeping count) and of ``storescu`` (its rusage, start-up included): less noisy
than wall time on a shared VM, and it shows where a receiver's cost is.

Two effects of the machine, not of the receivers, were found to move the ratio (2026-11-27, the
2-core CI-like VM; both hit ``storescp`` and the node alike, in different places):

- the page cache of new files costs 0.04-0.06 s per 100 MB on memory the hypervisor has backed and
  0.2-0.3 s on memory it has not (virtio-balloon free page reporting takes back what the guest
  frees). Starting a receiver per run, as this benchmark did until then, handed every ``storescp``
  run the memory that a node process had just freed: that design gave 0.43-0.91;
- creating a file on ext4 costs about 20 us normally and 150-550 us for a few minutes after many
  files were deleted (the inode allocator skips recently deleted inodes). Runs right after a large
  deletion gave 0.96-1.17 (why that state costs ``storescp`` more was not established).

So run it on a machine that deleted nothing in the last five minutes (this benchmark deletes its
files when it ends: wait before running it again), and quote the ratio with that condition.

``--split`` adds runs of the node's SCP (``radnet_node.ingest.IngestSCP``, the code ``serve`` runs)
in this process with its parts timed: the dataset written to the spool (with the header scan), the
checks and the move into place, the rest (PDU reads, waiting for the sender, the answers), and the
recorder's thread, which writes the catalog rows in batches alongside.

The DCMTK and node process harnesses are shared with the integration tests
(``tests/integration/dcmtk.py``, ``node_process.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.append(str(REPO / "tests"))  # fixed_weights (after tests/integration: its conftest)

from dcmtk import MAX_PDU, StoreScp, dcmtk_env, storescu_command  # noqa: E402
from node_process import NodeProcess, write_test_weights  # noqa: E402
from orthanc import free_port  # noqa: E402

from radnet_node import ingest  # noqa: E402
from radnet_node.audit import AuditDB  # noqa: E402
from radnet_node.config import NodeSection  # noqa: E402
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series  # noqa: E402


def synthetic_series(folder: Path, slices: int, size: int, uid_seed: str = "") -> list[Path]:
    """A head-like CT series of ``slices`` x ``size`` x ``size`` (uncompressed, 16 bit); a new
    ``uid_seed`` gives the same pixels under new UIDs."""
    spacing = 230.0 / size
    geometry = SeriesGeometry(
        rows=size,
        columns=size,
        pixel_spacing_mm=(spacing, spacing),
        table_positions_mm=tuple(float(z) for z in np.arange(slices) * 1.0),
        slice_thickness_mm=1.0,
    )
    return write_ct_series(
        _head_volume(slices, size), geometry, folder,
        StudyInfo(uid_seed=f"bench-ingest-{slices}-{size}{uid_seed}"),
        series_description="HEAD 1MM (BENCH INGEST)",
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _head_volume(slices: int, size: int) -> np.ndarray:
    spacing = 230.0 / size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    y, x = (yy - (size - 1) / 2) * spacing, (xx - (size - 1) / 2) * spacing
    plane = np.full((size, size), -1000.0, dtype=np.float32)
    plane[(y / 90.0) ** 2 + (x / 72.0) ** 2 <= 1.0] = 1000.0
    plane[(y / 84.0) ** 2 + (x / 66.0) ** 2 <= 1.0] = 32.0
    rng = np.random.default_rng(0)
    return plane[None] + rng.normal(0.0, 4.0, size=(slices, size, size)).astype(np.float32)


def send(port: int, ae_title: str, files: list[Path]) -> float:
    """Send ``files`` with storescu on one association; returns the wall time in seconds.

    Raises
    ------
    SystemExit
        storescu failed (its output is in the message).
    """
    command = storescu_command("127.0.0.1", port, files, called_ae=ae_title, calling_ae="BENCH")
    os.sync()  # every run starts without the previous run's dirty pages being written back
    start = time.perf_counter()
    done = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"storescu to {ae_title} failed ({done.returncode}):\n{done.stdout[-2000:]}"
        )
    return elapsed


def process_cpu(pid: int) -> tuple[float, float] | None:
    """User and system CPU seconds of process ``pid`` so far, its ended threads included (from
    ``/proc``, in clock ticks); None where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children_cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process's ended children (``storescu``) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def run_split(files: list[Path], work: Path) -> dict[str, float]:
    """One run into the node's SCP in this process, with the Python loop, its parts timed
    (``--split``): the association thread's time in the dataset writes (spool file + header
    scan), in the checks and the move into place, and after the answer (the hand-over to the
    recorder and the next request's spool file: the sender's next request is usually waiting by
    then, so this is on the critical path too); the recorder's own thread (catalog rows, in
    batches)."""
    spent = {
        "spool write": 0.0,
        "checks + place": 0.0,
        "hand-over": 0.0,
        "next spool file": 0.0,
        "recorder (own thread)": 0.0,
    }

    def timed(key: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapper

    patched = {
        (ingest._Incoming, "write"): "spool write",
        (ingest._Incoming, "_finish"): "checks + place",
        (ingest._Incoming, "record"): "hand-over",
        (ingest._Association, "_make_spare"): "next spool file",
        (ingest._Recorder, "_commit"): "recorder (own thread)",
    }
    originals = {target: getattr(*target) for target in patched}
    for (owner, name), key in patched.items():
        setattr(owner, name, timed(key, originals[owner, name]))
    try:
        work.mkdir(parents=True)
        node = NodeSection(host="127.0.0.1", port=free_port(), data_dir=work, min_free_disk_mb=1)
        scp = ingest.IngestSCP(node, AuditDB(f"sqlite:///{work / 'audit.sqlite'}"))
        scp.c_loop = False  # the parts timed are the Python loop's (the C loop has none)
        scp.start()
        try:
            elapsed = send(node.port, node.ae_title, files)
        finally:
            scp.stop()
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
    spooled = sum(1 for _ in (work / "spool").rglob("*.dcm"))
    if spooled != len(files):
        raise SystemExit(f"the in-process SCP spooled {spooled} of {len(files)} files")
    return {"wall": elapsed, **spent}


def _ratio_stats(
    reference: list[float], node: list[float], resamples: int = 10_000
) -> tuple[float, float, float, float]:
    """The ratio node / reference in images/s (the median time of the reference over the
    node's), the median of the per-round ratios, and the 5th and 95th percentiles of the ratio
    over the rounds resampled with replacement, each round's pair of runs kept together: how far
    the ratio could move on this machine's noise alone."""
    ratio = statistics.median(reference) / statistics.median(node)
    paired = statistics.median(r / n for r, n in zip(reference, node, strict=True))
    pairs = np.array([reference, node])
    picks = np.random.default_rng(0).integers(0, pairs.shape[1], size=(resamples, pairs.shape[1]))
    ratios = np.median(pairs[0][picks], axis=1) / np.median(pairs[1][picks], axis=1)
    low, high = np.percentile(ratios, [5, 95])
    return ratio, paired, float(low), float(high)


def _wait_for_rows(node: NodeProcess, count: int, timeout_s: float = 30.0) -> None:
    """Wait until the node's catalog holds ``count`` instances (exit naming the node if not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = node.query("SELECT count(*) FROM instances")
        rows = found[0][0] if found else 0
        if rows >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{node.workdir}: {rows} catalog rows of {count} in {timeout_s:g} s")
        time.sleep(0.005)


def _files(folder: Path) -> list[Path]:
    """The files under ``folder`` (storescp names them by SOP class and UID, the node's spool by
    study, series and UID, ending in .dcm; the node's temporary files end in .tmp), oldest first."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".tmp"]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def pool(files: list[Path]) -> dict[str, Any]:
    """The rounds of several saved runs as one sample: the ratio of the median times, the median
    of the per-round ratios and the bootstrap interval, as a single run prints them."""
    reference: list[float] = []
    node: list[float] = []
    for path in files:
        try:
            walls = json.loads(path.read_text())["wall_seconds"]
            reference += walls["dcmtk storescp"]
            node += walls["radnet-node"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not a bench_ingest.py --json result ({exc})") from None
    ratio, paired, low, high = _ratio_stats(reference, node)
    print(f"{len(files)} runs, {len(node)} rounds: ratio radnet-node / DCMTK {ratio:.2f} (target "
          f">= 1); median of the per-round ratios {paired:.2f}; 90 % bootstrap interval of the "
          f"ratio {low:.2f}-{high:.2f} (rounds resampled)")  # fmt: skip
    return {"runs": len(files), "rounds": len(node), "ratio_node_over_dcmtk": ratio,
            "median_round_ratio": paired, "ratio_interval_90": [low, high]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print a Markdown table; returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=16,
        help="rounds (16: each receiver four times in each place)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--split", action="store_true", help="also time the node's C-STORE handler in-process"
    )
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: pool the rounds of runs saved with --json and print their ratio",
    )
    args = parser.parse_args(argv)
    if args.pool:
        return pool(args.pool)

    names = (
        "dcmtk storescp",
        "radnet-node",
        "radnet-node, Python loop",
        "radnet-node, fsync_spool = true",
    )
    # each receiver in each place of a round twice (rotations, forwards and backwards), so none
    # has fixed neighbours
    orders = [names[i:] + names[:i] for i in range(len(names))]
    orders += [order[::-1] for order in orders]
    times: dict[str, list[float]] = {name: [] for name in names}
    # CPU seconds over all runs: the receiver's user and system time, then storescu's
    cpu: dict[str, list[float]] = {name: [0.0, 0.0, 0.0, 0.0] for name in names}
    splits: list[dict[str, float]] = []
    megabytes = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, contextlib.ExitStack() as up:
        work = Path(tmp)
        weights = write_test_weights(work / "weights" / "tiny.pt")
        dcmtk = up.enter_context(
            StoreScp(
                port=free_port(), output_dir=work / "dcmtk", ae_title="STORESCP", verbose=False
            )
        )
        nodes = {
            name: up.enter_context(
                NodeProcess(
                    work / folder,
                    weights=weights,
                    quiet_seconds=86400.0,
                    sections={"node": {"fsync_spool": fsync}},
                    environment={ingest.C_LOOP_ENV: loop},
                )
            )
            for name, folder, fsync, loop in (
                (names[1], "node", False, "c"),
                (names[2], "python", False, "python"),
                (names[3], "fsync", True, "c"),
            )
        }
        targets = {names[0]: (dcmtk.port, "STORESCP")}
        targets.update({name: (node.port, node.ae_title) for name, node in nodes.items()})
        received = {names[0]: work / "dcmtk"}
        received.update({name: node.data_dir / "spool" for name, node in nodes.items()})
        pids = {names[0]: dcmtk.pid}
        pids.update({name: node.pid for name, node in nodes.items()})
        for repeat in range(args.repeats):
            for turn, name in enumerate(orders[repeat % len(orders)]):
                files = synthetic_series(
                    work / f"series-{repeat}-{turn}", args.slices, args.size, f"-{repeat}-{turn}"
                )
                receiver_before, sender_before = process_cpu(pids[name]), children_cpu()
                times[name].append(send(*targets[name], files))
                sender_after = children_cpu()
                if name in nodes:
                    # the node commits the association's catalog rows after its A-RELEASE-RP:
                    # its CPU is read once they are in, so that it counts all of its work
                    _wait_for_rows(nodes[name], args.slices * (repeat + 1))
                receiver_after = process_cpu(pids[name])
                if receiver_before is not None and receiver_after is not None:
                    for i in range(2):
                        cpu[name][i] += receiver_after[i] - receiver_before[i]
                        cpu[name][2 + i] += sender_after[i] - sender_before[i]
                held = _files(received[name])
                if len(held) != args.slices * (repeat + 1):
                    log = nodes[name].log_tail() if name in nodes else ""
                    raise SystemExit(f"round {repeat + 1}: {name} holds {len(held)} instances{log}")
                megabytes = sum(f.stat().st_size for f in held[-args.slices :]) / 2**20
            if args.split:
                files = synthetic_series(work / "split", args.slices, args.size, f"-split-{repeat}")
                splits.append(run_split(files, work / f"split-{repeat}"))
    rates = {name: args.slices / statistics.median(t) for name, t in times.items()}
    ratio, paired, low, high = _ratio_stats(times[names[0]], times[names[1]])
    print(
        f"\n{args.slices} instances, {args.size} x {args.size}, {megabytes:.0f} MB, one "
        f"association, max PDU {MAX_PDU}, TCP_NODELAY=1, {args.repeats} runs each (median), "
        "receivers up throughout, a new series per run, every order of the receivers in turn\n"
    )
    print("| receiver | images/s | MB/s | wall s (runs) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        runs = ", ".join(f"{x:.2f}" for x in t)
        print(f"| {name} | {rates[name]:.0f} | {rates[name] * megabytes / args.slices:.1f} "
              f"| {statistics.median(t):.2f} ({runs}) |")  # fmt: skip
    print(f"\nratio radnet-node / DCMTK: {ratio:.2f} (target >= 1); with the Python loop: "
          f"{rates['radnet-node, Python loop'] / rates['dcmtk storescp']:.2f}; with "
          f"fsync_spool = true: "
          f"{rates['radnet-node, fsync_spool = true'] / rates['dcmtk storescp']:.2f}; median of "
          f"the per-round ratios {paired:.2f}; 90 % bootstrap interval of the ratio "
          f"{low:.2f}-{high:.2f} (rounds resampled)")  # fmt: skip
    per_instance = args.slices * args.repeats / 1e6  # CPU seconds -> microseconds per instance
    if any(any(values) for values in cpu.values()):
        print(
            "\nCPU per instance, us, over all runs (the receiver from /proc in clock ticks, a node "
            "once its catalog holds the run's rows; storescu from its rusage, start-up included)\n"
        )
        print("| receiver | receiver user | receiver system | storescu user | storescu system |")
        print("|---|---|---|---|---|")
        for name, values in cpu.items():
            print(f"| {name} | " + " | ".join(f"{v / per_instance:.0f}" for v in values) + " |")
    split: dict[str, float] = {}
    if splits:
        # the run with the median wall time, per instance
        middle = sorted(splits, key=lambda run: run["wall"])[len(splits) // 2]
        split = {key: value / args.slices * 1000 for key, value in middle.items()}
        handler = sum(split[key] for key in ("spool write", "checks + place", "hand-over",
                                             "next spool file"))  # fmt: skip
        print(f"\nin-process SCP, ms per instance (median run, {args.slices / middle['wall']:.0f} "
              f"images/s): total {split['wall']:.2f}; dataset written to the spool (and header "
              f"scanned) {split['spool write']:.2f}; checks and move into place "
              f"{split['checks + place']:.2f}; after the answer: hand-over to the recorder "
              f"{split['hand-over']:.2f}, next spool file {split['next spool file']:.2f}; "
              f"the rest (PDU reads, waiting for the sender, "
              f"answers) {split['wall'] - handler:.2f}; recorder thread, in parallel "
              f"{split['recorder (own thread)']:.2f}")  # fmt: skip
    figures = {
        "instances": args.slices,
        "size": args.size,
        "megabytes": megabytes,
        "max_pdu": MAX_PDU,
        "repeats": args.repeats,
        "wall_seconds": times,
        "images_per_second": rates,
        "ratio_node_over_dcmtk": ratio,
        "median_round_ratio": paired,
        "ratio_interval_90": [low, high],
        "cpu_us_per_instance": {
            name: dict(
                zip(
                    ("receiver_user", "receiver_system", "storescu_user", "storescu_system"),
                    (v / per_instance for v in values),
                    strict=True,
                )
            )
            for name, values in cpu.items()
        },  # fmt: skip
        "orders": [list(order) for order in orders[: args.repeats]],
        "in_process_ms_per_instance": split or None,
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


if __name__ == "__main__":
    main()
