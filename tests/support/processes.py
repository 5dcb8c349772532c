"""Helpers for tests and benchmarks that start Flower's processes on loopback (Linux).

:func:`wait_for_superlink` waits for a SuperLink to answer, :func:`free_port` finds a port,
:func:`process_table` and :func:`descendants` walk /proc once, to find and stop every process a
test started and to account the CPU time of a benchmark's processes. Standard library only
(``httpx``, which flwr installs, in :func:`wait_for_superlink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def wait_for_superlink(port: int, proc: Any, seconds: float = 60.0, ca: str | None = None) -> None:
    """Wait until the SuperLink process ``proc`` (a ``subprocess.Popen``) answers /health on 127.0.0.1:``port``
    (over HTTPS, trusting the certificate authority file ``ca``, when it is given).

    Raises RuntimeError if the process exits first, TimeoutError after ``seconds``.
    """
    import ssl
    import time

    import httpx

    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    verify: Any = ssl.create_default_context(cafile=str(ca)) if ca else True
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=0.5, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not answer on 127.0.0.1:{port} within {seconds} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far: user + system) of every live process, from /proc (Linux)."""
    import os
    from pathlib import Path

    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()  # state ppid ... utime stime: fields 3, 4, 14, 15 of proc(5)
            table[int(d.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    return table


def descendants(pid: int, table: Mapping[int, tuple[int, float]] | None = None) -> list[int]:
    """Every live descendant of ``pid`` (children before their own children), from ``table`` or a fresh :func:`process_table`."""
    children: dict[int, list[int]] = {}
    for q, (ppid, _) in (process_table() if table is None else table).items():
        children.setdefault(ppid, []).append(q)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
