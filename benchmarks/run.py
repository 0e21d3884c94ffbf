"""The benchmark suite: mprun against what users write instead, side by side in one run.

    .venv/bin/python benchmarks/run.py            # full sizes (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # sizes / 10, for a smoke check
    .venv/bin/python benchmarks/run.py --only W1,W3 --runs 5

Every contender is a whole process (``python contenders.py NAME N``, or ``mprun FILE``) started by this
script; each is timed from ``Popen`` to ``wait4`` and its peak RSS is the largest ``ru_maxrss`` of any
process of its tree (Linux propagates the children's maximum through ``wait``).  Figures are medians
of ``--runs`` runs (default 3), the contenders of one workload interleaved run by run, so a noisy
neighbour hits them alike.

The work and the sink are the same everywhere: double ``range(N)`` on 2 worker processes and sum the
doubled numbers in one place.  For the hand-written contenders the parent process sums; for mprun a
1-process consumer stage (``tasks:add``) sums and prints the total when it exits.  Every run's printed
``sum=... count=...`` is checked, so a contender that drops items fails loudly instead of looking fast.

Start-up is measured as users meet it: Python bytecode compiled (``compileall`` on mprun and the benchmark
modules first, as installing a package does; this machine sets PYTHONDONTWRITEBYTECODE) and the pipeline
run once before the timed runs, so its compiled plan is in ``runner.cache``.  W3 also times a run with
``MPRUN_NO_CACHE=1``: a file never run before.

mpire and pypeln (benchmarks/requirements.txt) are installed into ``benchmarks/.venv`` on first use;
they are never dependencies of the project.  The table is printed and written to
``benchmarks/results/latest.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PEER_VENV = BENCH / ".venv"
PYTHON = sys.executable
MPRUN = [str(Path(sys.executable).with_name("mprun"))]  # the console script users run; see --mprun


@dataclass
class Contender:
    """One command to time: a label, the command line, and what its output must say."""

    label: str
    cmd: list[str]
    items: int
    expect_sum: int | None = None  # checked against the `sum=` line it prints; None = not checked
    expect_count: int | None = None
    peer: bool = False  # needs benchmarks/.venv
    env: dict[str, str] = field(default_factory=dict)  # added to the environment of its runs
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # KiB
    error: str | None = None

    @property
    def median(self) -> float:
        """Median wall seconds (inf when it failed)."""
        return statistics.median(self.walls) if self.walls and not self.error else float("inf")

    @property
    def peak_mib(self) -> float:
        """Median peak RSS of the largest process of the tree, MiB."""
        return statistics.median(self.rss) / 1024 if self.rss else float("nan")


def measure(c: Contender, env: dict[str, str]) -> None:
    """Run ``c`` once: wall time, peak RSS of its process tree, and a check of what it printed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(c.cmd, stdout=out, stderr=err, env=env | c.env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        c.error = f"exit {proc.returncode}: {errors.strip().splitlines()[-1:] or ''}"
        return
    match = re.search(r"sum=(-?\d+) count=(\d+)", text)
    if c.expect_count is not None:
        if not match:
            c.error = f"printed no total: {text[-200:]!r}"
            return
        got_sum, got_count = int(match[1]), int(match[2])
        if got_count != c.expect_count or (c.expect_sum is not None and got_sum != c.expect_sum):
            c.error = f"wrong total: sum={got_sum} count={got_count}, expected {c.expect_sum}/{c.expect_count}"
            return
    c.walls.append(wall)
    c.rss.append(usage.ru_maxrss)


def pipeline(template: str, n: int) -> str:
    """A copy of ``benchmarks/<template>`` whose producer range stops at ``n`` (in benchmarks/results/)."""
    text = (BENCH / template).read_text()
    text, count = re.subn(r"stop: \d+", f"stop: {n}", text)
    assert count == 1, template
    path = RESULTS / f"{Path(template).stem}-{n}.yaml"
    path.write_text(text)
    return str(path)


def ensure_peers() -> str | None:
    """Install benchmarks/requirements.txt into benchmarks/.venv once; its python, or None if that fails."""
    reqs = (BENCH / "requirements.txt").read_bytes()
    stamp = PEER_VENV / "requirements.sha256"
    digest = hashlib.sha256(reqs).hexdigest()
    python = PEER_VENV / "bin" / "python"
    if stamp.exists() and stamp.read_text() == digest and python.exists():
        return str(python)
    print("installing benchmarks/requirements.txt into benchmarks/.venv ...", file=sys.stderr)
    try:
        subprocess.run([PYTHON, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")], check=True
        )
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"peer libraries unavailable ({e}); their rows are skipped", file=sys.stderr)
        return None
    stamp.write_text(digest)
    return str(python)


def calibrate(ms: float = 6.0) -> int:
    """Loops of ``tasks.burn`` per millisecond on this machine, so that one call takes about ``ms``.

    The best of 7 timings of a 10-call burst: on a shared machine the fastest run is the least disturbed.
    """
    sys.path.insert(0, str(BENCH))
    import tasks

    tasks.LOOPS_PER_MS = 25_000
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for i in range(10):
            tasks.burn(i, ms)
        best = min(best, (time.perf_counter() - t0) / 10)
    return int(tasks.LOOPS_PER_MS * ms / (best * 1000))


@dataclass
class Workload:
    """Contenders run side by side; ratios are taken against ``reference``."""

    name: str
    title: str
    contenders: list[Contender]
    reference: str  # label of the contender ratios are taken against


def w1_contenders(n: int, labels: list[str], peer_python: str | None) -> list[Contender]:
    """W1 rows for ``n`` items: a hand-written contender per label, or mprun's pipelines."""
    total, rows = n * (n - 1), []
    for label in labels:
        if label.startswith("mprun"):
            template = "w1_consumer.yaml" if "consumer" in label else "w1_pool.yaml"
            cmd = [*MPRUN, pipeline(template, n), "--no-summary"]
            if "fork)" in label:
                cmd += ["--start-method", "fork"]
            rows.append(Contender(label, cmd, n, total, n))
        else:
            peer = label in ("mpire", "pypeln")
            if peer and peer_python is None:
                continue
            python = peer_python if peer else PYTHON
            rows.append(Contender(label, [python, str(BENCH / "contenders.py"), label, str(n)], n, total, n, peer))
    return rows


def workloads(quick: bool, only: set[str], peer_python: str | None) -> list[Workload]:
    """The workloads at full size, or at a tenth of it with ``--quick``."""
    scale = 10 if quick else 1
    big, small, tiny = 2_000_000 // scale, 200_000 // scale, 20_000 // scale
    mprun_rows = ["mprun pool", "mprun pool (fork)", "mprun consumer"]
    out = []
    if "W1" in only:
        out.append(Workload("W1", f"W1: range({big:,}) -> 2 workers doubling -> sum", w1_contenders(
            big, ["imap1000", "executor1000", "mpire", *mprun_rows, "serial"], peer_python), "imap1000"))
        out.append(Workload("W1", f"W1: range({small:,}) against the tutorial style", w1_contenders(
            small, ["tutorial", "imap1", "imap1000", "mpire", *mprun_rows], peer_python), "tutorial"))
        if peer_python:
            out.append(Workload("W1", f"W1: range({tiny:,}), where pypeln is measured", w1_contenders(
                tiny, ["pypeln", "tutorial", "imap1000", *mprun_rows], peer_python), "pypeln"))
    if "W2" in only:
        calls = 400
        rows = [
            Contender("serial loop", [PYTHON, str(BENCH / "contenders.py"), "serial_burn", str(calls)],
                      calls, calls * (calls - 1) // 2, calls),
            Contender("Pool(2).imap_unordered", [PYTHON, str(BENCH / "contenders.py"), "pool_burn", str(calls)],
                      calls, calls * (calls - 1) // 2, calls),
            Contender("serial loop, 0 calls", [PYTHON, str(BENCH / "contenders.py"), "serial_burn", "0"], 0, 0, 0),
            Contender("mprun pool", [*MPRUN, pipeline("w2_pool.yaml", calls), "--no-summary"],
                      calls, calls * (calls - 1) // 2, calls),
            Contender("mprun pool, 0 calls", [*MPRUN, pipeline("w2_pool.yaml", 0), "--no-summary"], 0, 0, 0),
        ]
        out.append(Workload("W2", f"W2: {calls} calls of ~6 ms CPU on 2 processes", rows, "serial loop"))
    if "W3" in only:
        rows = [
            Contender("python -c 'import yaml, pydantic, structlog'",
                      [PYTHON, "-c", "import yaml, pydantic, structlog"], 0),
            Contender("mprun benchmarks/w3_doubler.yaml", [*MPRUN, str(BENCH / "w3_doubler.yaml"), "--no-summary"], 5),
            Contender("mprun benchmarks/w3_doubler.yaml, MPRUN_NO_CACHE=1",
                      [*MPRUN, str(BENCH / "w3_doubler.yaml"), "--no-summary"], 5, env={"MPRUN_NO_CACHE": "1"}),
        ]
        out.append(Workload("W3", "W3: start-up, doubler.yaml end to end (delay 0)", rows, rows[0].label))
    if "W4" in only:
        n = 2_000 // scale
        total = n * (n - 1) // 2
        rows = [
            Contender("Pool(2).imap(chunksize=1)", [PYTHON, str(BENCH / "contenders.py"), "imap1_blobs", str(n)],
                      n, total, n),
            Contender("mprun pool", [*MPRUN, pipeline("w4_blobs.yaml", n), "--no-summary"], n, total, n),
            Contender("mprun pool, 5x the items", [*MPRUN, pipeline("w4_blobs.yaml", 5 * n), "--no-summary"],
                      5 * n, 5 * n * (5 * n - 1) // 2, 5 * n),
        ]
        out.append(Workload("W4", f"W4: {n:,} items of 1 MiB -> 2 workers building 1 MiB results -> sum", rows,
                            rows[0].label))
    if "W5" in only:
        n = 2_000 // scale
        total = n * (n - 1) // 2
        rows = [
            Contender("ThreadPoolExecutor(100)", [PYTHON, str(BENCH / "contenders.py"), "executor100_wait", str(n)],
                      n, total, n),
            Contender("mprun pool, 2 processes x concurrency 50", [*MPRUN, pipeline("w5_io.yaml", n), "--no-summary"],
                      n, total, n),
        ]
        out.append(Workload("W5", f"W5: {n:,} calls waiting 20 ms each (ideal {n * 0.02 / 100:.2f} s)", rows,
                            rows[0].label))
    if "W6" in only:
        megabytes = 100 // scale
        sys.path.insert(0, str(BENCH))
        from tasks import WordCount, text

        path = text(str(RESULTS / "w6_text.txt"), megabytes)
        counter, lines = WordCount(), 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                counter(line)
                lines += 1
        words, distinct = sum(counter.counts.values()), len(counter.counts)
        template = (BENCH / "w6_wordcount.yaml").read_text()
        (RESULTS / "w6_wordcount.yaml").write_text(template)
        rows = [
            Contender("Pool(2).imap_unordered + Counter", [PYTHON, str(BENCH / "contenders.py"), "imap_wordcount",
                                                           str(megabytes)], lines, words, distinct),
            Contender("mprun, class stages with close()", [*MPRUN, str(RESULTS / "w6_wordcount.yaml"), "--no-summary"],
                      lines, words, distinct),
        ]
        out.append(Workload("W6", f"W6: word count over {megabytes} MB of text ({lines:,} lines)", rows,
                            rows[0].label))
    if "MEM" in only:
        rows = [
            Contender(f"mprun ordered pool, {n:,} items", [*MPRUN, pipeline("mem_pool.yaml", n), "--no-summary"],
                      n, n * (n - 1), n)
            for n in (5_000_000 // scale, 500_000 // scale)
        ]
        out.append(Workload("MEM", "Memory: peak RSS of the largest process, 10x the items", rows, rows[1].label))
    return out


def table(loads: list[Workload]) -> list[str]:
    """Markdown rows: one per contender, ratios against each workload's reference."""
    lines = [
        "| workload | contender | items | median s | items/s | peak RSS MiB | vs reference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in loads:
        ref = next(c for c in w.contenders if c.label == w.reference)
        for c in w.contenders:
            if c.error:
                lines.append(f"| {w.title} | {c.label} | {c.items:,} | failed: {c.error} | | | |")
                continue
            rate = f"{c.items / c.median:,.0f}" if c.items else ""
            ratio = "reference" if c is ref else f"{c.median / ref.median:.2f}x"
            lines.append(
                f"| {w.title} | {c.label} | {c.items:,} | {c.median:.3f} | {rate} | {c.peak_mib:.0f} | {ratio} |"
            )
    return lines


def targets(loads: list[Workload]) -> list[str]:
    """The targets, each PASS or FAIL with its figure."""

    def get(title_start: str, label: str) -> Contender | None:
        for w in loads:
            if w.title.startswith(title_start):
                for c in w.contenders:
                    if c.label == label and not c.error:
                        return c
        return None

    lines = []

    def check(name: str, value: float | None, limit: float, better: str, unit: str = "x") -> None:
        if value is None:
            lines.append(f"- {name}: not measured")
            return
        ok = value <= limit if better == "<=" else value >= limit
        lines.append(f"- {name}: {value:.2f}{unit} (target {better} {limit}{unit}) **{'PASS' if ok else 'FAIL'}**")

    for w in loads:
        if w.name == "W1" and w.reference == "imap1000":
            ref = get(w.title, "imap1000")
            for label in ("mprun pool", "mprun pool (fork)", "mprun consumer"):
                c = get(w.title, label)
                check(f"W1 {label} / Pool.imap(chunksize=1000), {c.items if c else 0:,} items",
                      c.median / ref.median if c and ref else None, 2.0, "<=")
        if w.name == "W1" and w.reference == "tutorial":
            ref = get(w.title, "tutorial")
            for label in ("mprun consumer", "mprun pool"):
                c = get(w.title, label)
                check(f"W1 tutorial style / {label}, {c.items if c else 0:,} items (speed-up)",
                      ref.median / c.median if c and ref else None, 5.0, ">=")
        if w.name == "W2":
            s, s0 = get(w.title, "serial loop"), get(w.title, "serial loop, 0 calls")
            m, m0 = get(w.title, "mprun pool"), get(w.title, "mprun pool, 0 calls")
            speedup = s.median / m.median if s and m else None
            check("W2 speed-up over the serial loop, whole process", speedup, 1.8, ">=")
            work = (s.median - s0.median) / (m.median - m0.median) if s and s0 and m and m0 else None
            check("W2 speed-up over the serial loop, start-up subtracted", work, 1.8, ">=")
            p = get(w.title, "Pool(2).imap_unordered")
            if s and p and m:  # not a target: what a hand-written pool reaches on the machine in the same run
                lines.append(f"- W2 for reference, hand-written `Pool(2).imap_unordered` over the serial loop: "
                             f"{s.median / p.median:.2f}x (mprun / Pool: {m.median / p.median:.2f}x)")
        if w.name == "W3":
            ref, *rows = w.contenders
            for c, how, limit in zip(rows, ("", ", cache off"), (1.2, 2.0), strict=True):
                check(f"W3 mprun doubler{how} / python -c import",
                      c.median / ref.median if not (c.error or ref.error) else None, limit, "<=")
        if w.name == "W4":
            ref, pool, more = w.contenders
            check("W4 mprun pool / Pool(2).imap(chunksize=1), 1 MiB items",
                  pool.median / ref.median if not (pool.error or ref.error) else None, 1.5, "<=")
            peak = pool.peak_mib if not pool.error else None
            check("W4 peak RSS of mprun's largest process", peak, 320, "<=", " MiB")
            check("W4 peak RSS at 5x the items / at 1x", more.peak_mib / pool.peak_mib
                  if not (pool.error or more.error) else None, 1.3, "<=")
        if w.name == "W5":
            ref, pool = w.contenders
            check("W5 mprun pool x concurrency 50 / ThreadPoolExecutor(100)",
                  pool.median / ref.median if not (pool.error or ref.error) else None, 1.5, "<=")
            ideal = pool.items * 0.02 / 100
            check("W5 mprun pool / the ideal (calls x 20 ms / 100 at once)",
                  pool.median / ideal if not pool.error and ideal else None, 10.0, "<=")
        if w.name == "W6":
            ref, pool = w.contenders
            check("W6 mprun word count / Pool.imap_unordered + Counter",
                  pool.median / ref.median if not (pool.error or ref.error) else None, 1.5, "<=")
        if w.name == "MEM":
            big, small = w.contenders
            value = big.peak_mib / small.peak_mib if not (big.error or small.error) else None
            check("Memory: peak RSS at 10x the items", value, 1.3, "<=")
    return lines


def machine() -> list[str]:
    """What the figures were measured on."""
    free = subprocess.run(["free", "-h"], check=False, capture_output=True, text=True).stdout.splitlines()
    mem = free[1].split()[1] if len(free) > 1 else "?"
    cpus = len(os.sched_getaffinity(0))
    return [
        f"- machine: `nproc` {cpus}, `free -h` total {mem}, {platform.platform()}",
        f"- python {platform.python_version()}; load average at start {os.getloadavg()[0]:.2f}",
    ]


def main() -> int:
    """Run the selected workloads and print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the items everywhere")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender; the median is reported")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6,MEM", help="comma-separated: W1 ... W6, MEM")
    parser.add_argument("--mprun", help="the mprun command (default: the mprun beside this python)")
    parser.add_argument("--no-peers", action="store_true", help="skip mpire and pypeln (no benchmarks/.venv)")
    args = parser.parse_args()
    if args.mprun:
        MPRUN[:] = args.mprun.split()
    only = {s.strip().upper() for s in args.only.split(",")}
    RESULTS.mkdir(exist_ok=True)
    peer_python = None if args.no_peers or "W1" not in only else ensure_peers()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPRUN_BENCH_LOOPS_PER_MS"] = str(calibrate())
    head = machine()
    compiled = [str(ROOT / "runner"), str(ROOT / "schemas"), str(BENCH / "tasks.py"), str(BENCH / "contenders.py")]
    subprocess.run([PYTHON, "-m", "compileall", "-q", *compiled], check=True, stdout=subprocess.DEVNULL)
    loads = workloads(args.quick, only, peer_python)
    for w in loads:
        print(f"{w.title} ...", file=sys.stderr, flush=True)
        for c in w.contenders:
            if c.cmd[:len(MPRUN)] == MPRUN:
                measure(c, env)  # untimed: fills runner.cache (and the page cache) as a user's earlier run would
                c.walls.clear()
                c.rss.clear()
        for _ in range(args.runs):
            for c in w.contenders:
                if not c.error:
                    measure(c, env)
    command = "benchmarks/run.py " + " ".join(sys.argv[1:])
    report = [f"Command: `.venv/bin/python {command.strip()}` (median of {args.runs} runs)", "", *head, "",
              *table(loads), "", "Targets:", "", *targets(loads)]
    text = "\n".join(report) + "\n"
    (RESULTS / "latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
