"""Stopping exactly the processes of one Ray instance, for the tests that start Ray outside pytest's process
(``ray start --head``, an ``rjem train`` subprocess with its own local Ray).

An instance is found by its private temp dir (``--temp-dir`` / ``RAY_TMPDIR``), which every one of its processes
names on its command line; ``ray stop`` would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from pathlib import Path


def _processes() -> list[tuple[int, int, bytes]]:
    """``(pid, ppid, cmdline)`` of every process still readable in /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(d.name), ppid, cmdline))
    return out


def _pids_of_instance(temp_dir: str) -> set[int]:
    """The processes of the Ray instance that uses ``temp_dir``, and everything they started."""
    procs = _processes()
    children = defaultdict(list)
    for pid, ppid, _ in procs:
        children[ppid].append(pid)
    found = {pid for pid, _, cmd in procs if temp_dir.encode() in cmd and pid != os.getpid()}
    stack = list(found)
    while stack:
        for child in children[stack.pop()]:
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def stop_instance(temp_dir: str, grace_s: float = 10.0) -> set[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every process of this instance; returns the survivors."""
    pids = _pids_of_instance(temp_dir)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 3.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}
            if not pids:
                return set()
            time.sleep(0.2)
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
