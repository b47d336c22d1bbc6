"""Run a timing command with the cores to itself: every other Python process on the machine (not
in the command's own process tree) is paused (SIGSTOP) while it runs and resumed (SIGCONT) after.

    python -m benchmarks.quiet LOG -- COMMAND [ARGS...]

Why: on a shared 2-core VM, background work (tests, training) at any priority slows the rows of a
paired benchmark unevenly: llama.cpp's spinning thread barrier fell to ~1 token/s beside a niced
training job, and onnxruntime's waking threads lose tens of percent. Paused processes do not
count in the load average, which lags by a minute: the figures a report prints at its start
may still show the work that was paused. `uptime` is appended to LOG before and after, with the
number of processes paused. Only this project's own background work should be paused this way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

KINDS = ("python", "pytest", "lama ")  # command lines of the work to pause


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _lineage(pid: int | None) -> set[int]:
    out = set()
    while pid and pid > 1:
        out.add(pid)
        pid = _parent(pid)
    return out


def _sweep(me: int, mine: set[int], paused: set[int]) -> None:
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in paused or int(name) in mine:
            continue
        pid = int(name)
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if not any(k in cmd for k in KINDS) or me in _lineage(pid):
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
            paused.add(pid)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") != 1 or len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    log_path, cmd = argv[0], argv[2:]
    me, paused = os.getpid(), set()
    mine = _lineage(me)
    with open(log_path, "a") as log:
        _sweep(me, mine, paused)
        log.write(f"[quiet] {subprocess.run(['uptime'], capture_output=True, text=True).stdout}")
        log.flush()
        time.sleep(3)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                _sweep(me, mine, paused)
                time.sleep(0.5)
        finally:
            for pid in paused:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
            log.write(f"[quiet] {subprocess.run(['uptime'], capture_output=True, text=True).stdout}"
                      f"[quiet] paused and resumed {len(paused)} processes\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
