"""CPU seconds of every process of one ``mprun`` run, by role: where a run's time goes.

    .venv/bin/python benchmarks/cpu_by_process.py benchmarks/results/w1_pool-2000000.yaml
    .venv/bin/python benchmarks/cpu_by_process.py FILE --start-method fork      # any other mprun options

It runs ``mprun FILE --log-format json --log-level info --no-summary`` and samples ``/proc/PID/stat``
(user + system time) of the whole process tree every 10 ms until the run ends; the last sample of each
process is its total (a process's last few milliseconds are missed).  Stage processes are named from
their ``process started`` log records; the others are the main process, the forkserver, the resource
tracker and the import check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks) of ``root`` and its descendants now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    found, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return {pid: table[pid] for pid in found if pid in table}


def main() -> int:
    """Run mprun with the arguments given and print CPU seconds per process."""
    mprun = str(Path(sys.executable).with_name("mprun"))
    with tempfile.TemporaryFile() as err:
        cmd = [mprun, *sys.argv[1:], "--log-format", "json", "--log-level", "info", "--no-summary"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        seen: dict[int, tuple[int, int]] = {}
        while proc.poll() is None:
            for pid, (ppid, ticks) in _tree(proc.pid).items():
                seen[pid] = (ppid, max(ticks, seen.get(pid, (0, 0))[1]))
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        err.seek(0)
        names = {}
        for line in err.read().decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "process started" and "pid" in record:
                names[record["pid"]] = f"{record['process']} ({record['stage']})"
    server = next((pid for pid, (ppid, _) in seen.items() if ppid == proc.pid and any(
        p == pid for p, _ in seen.values()) and pid not in names), None)
    print(f"exit {proc.returncode}, {wall:.2f} s wall")
    for pid, (ppid, ticks) in sorted(seen.items()):
        role = names.get(pid) or ("main" if pid == proc.pid else "forkserver" if pid == server else
                                  "import check" if ppid == server else "resource tracker / other")
        print(f"{ticks / TICK:6.2f} s  {role}")
    print(f"{sum(t for _, t in seen.values()) / TICK:6.2f} s  in all")
    return proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
