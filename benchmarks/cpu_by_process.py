"""CPU seconds by process role for one command's whole process tree (Ray's included).

Runs COMMAND, samples every process below it every 0.5 s (psutil), and prints one JSON
object: wall seconds, exit code, total CPU seconds (user + sys) and CPU seconds per role
(``ray::<name>`` for Ray workers and actors, the executable name for raylet, GCS, the
dashboard and the log monitor, else the command line's start). A process is booked under
the last name it had: a Ray worker is renamed ``ray::IDLE`` between tasks and as it exits,
so part of the training workers' and actors' CPU lands there. CPU used in the last half
second of a process's life is missed.

    python benchmarks/cpu_by_process.py imgpipe demo --workdir /tmp/dq1
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import psutil

SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")


def role(proc: psutil.Process) -> str | None:
    """What to book ``proc`` under; None when it is gone."""
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())[:200]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if name.startswith("ray::"):
        return name
    system = next((key for key in SYSTEM if key in cmd), None)
    return system or f"{name}: {cmd[:60]}"


def main(argv: list[str]) -> dict:
    t0 = time.time()
    child = subprocess.Popen(argv)
    seen: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds at the last sample)
    while child.poll() is None:
        try:
            root = psutil.Process(child.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            r = role(proc)
            try:
                cpu = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if r is not None:
                seen[proc.pid] = (r, cpu.user + cpu.system)
        time.sleep(0.5)
    by_role: Counter[str] = Counter()
    for r, cpu in seen.values():
        by_role[r] += cpu
    return {"wall_seconds": round(time.time() - t0, 1), "returncode": child.returncode,
            "cpu_seconds": round(sum(by_role.values()), 1),
            "by_role": {k: round(v, 1) for k, v in by_role.most_common()}}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1:]), indent=1))
