"""Progress of long steps (training rounds, sweeps, Monte Carlo and mixture certification), with an ETA.

A :class:`Bar` writes to stderr, never to stdout (results stay pipeable). On a terminal it
redraws one line in place (at most ten times a second); elsewhere, only when asked
(``crfl --progress``), it writes a line every ~10% of the work. Whether bars are shown is
decided once, by the caller that owns the terminal (the ``crfl`` command: on when stderr is a
terminal, off with ``-q``, forced with ``--progress``), through :func:`showing`, a context
variable, so that the library's long loops (:mod:`crfl.smoothing`, :mod:`crfl.mixture`, the
driver's rounds) need no flag passed down: ``with progress.bar(M, "Monte Carlo") as b: ...
b.update(m)`` costs nothing when bars are off. :func:`stage` names the step a bar belongs to
(``sweep 3/12: round 40/100``), so a sweep's jobs and the run inside read as one line.

ETA: the remaining work at the rate measured since the bar started (``elapsed / done *
(total - done)``; work done before a resume is not counted in the rate).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import time
from collections.abc import Iterator
from typing import TextIO

#: Whether bars are drawn: None (off), "tty" (redraw in place) or "lines" (a line every ~10%).
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("crfl_progress_mode", default=None)
#: The names of the steps the current bar is part of (outermost first).
_STAGE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("crfl_progress_stage", default=())

#: Seconds between two redraws of a terminal bar.
REDRAW = 0.1
WIDTH = 24


def mode_for(stream: TextIO, *, quiet: bool = False, force: bool = False) -> str | None:
    """The mode a command should show: off when ``quiet``; a redrawn bar on a terminal; lines
    elsewhere only when ``force``d (a log file or a pipe gets no bars unless asked)."""
    if quiet:
        return None
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        return "tty"
    return "lines" if force else None


@contextlib.contextmanager
def showing(mode: str | None) -> Iterator[None]:
    """Show bars in ``mode`` (:func:`mode_for`) inside the block."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def enabled() -> bool:
    return _MODE.get() is not None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Bars inside the block are prefixed with ``name`` (``sweep 3/12``)."""
    token = _STAGE.set((*_STAGE.get(), name))
    try:
        yield
    finally:
        _STAGE.reset(token)


def fmt_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when not known."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta(elapsed: float, done: float, total: float) -> float:
    """Seconds left at the rate so far: ``elapsed / done * (total - done)`` (inf before any work)."""
    if done <= 0:
        return math.inf
    return max(0.0, elapsed / done * (total - done))


class Bar:
    """One long step of ``total`` units: :meth:`update` with the units done so far, :meth:`close` at the end.

    ``mode`` None draws nothing (the default comes from :func:`showing`); ``start``: units done
    before this process began (a resumed run), excluded from the rate.
    """

    def __init__(self, total: int, label: str, *, unit: str = "", start: int = 0, mode: str | None = None,
                 stream: TextIO | None = None, clock=time.perf_counter) -> None:
        self.total, self.label, self.unit = max(1, int(total)), label, unit
        self.mode = _MODE.get() if mode is None else mode
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = clock()
        self.start = self.done = int(start)
        self.prefix = ": ".join(_STAGE.get())
        self.every = max(1, self.total // 10)
        self._drawn = -math.inf
        self._last_line = -1
        self.closed = False

    def message(self, detail: str = "") -> str:
        elapsed = self.clock() - self.t0
        left = eta(elapsed, self.done - self.start, self.total - self.start)
        filled = int(WIDTH * self.done / self.total)
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.prefix}: " if self.prefix else ""
        msg = f"{head}{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}{unit}"
        if detail:
            msg += f"  {detail}"
        tail = f"  {fmt_seconds(elapsed)}" + ("" if self.done >= self.total else f", ETA {fmt_seconds(left)}")
        return msg + tail

    def update(self, done: int, detail: str = "") -> None:
        self.done = min(int(done), self.total)
        if self.mode is None or self.closed:
            return
        final = self.done >= self.total
        if self.mode == "tty":
            now = self.clock()
            if not final and now - self._drawn < REDRAW:
                return
            self._drawn = now
            self.stream.write("\r\x1b[K" + self.message(detail) + ("\n" if final else ""))
        else:
            step = self.done // self.every
            if not final and step == self._last_line:
                return
            self._last_line = step
            self.stream.write(self.message(detail) + "\n")
        self.stream.flush()
        if final:
            self.closed = True

    def close(self) -> None:
        """End the bar's line (a step that stopped early leaves its last state on screen)."""
        if self.mode == "tty" and not self.closed and self._drawn > -math.inf:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int, label: str, *, unit: str = "", start: int = 0) -> Bar:
    """A :class:`Bar` in the mode of :func:`showing` (drawing nothing when bars are off)."""
    return Bar(total, label, unit=unit, start=start)


def _rows_in(path: str) -> int:
    """Complete data rows of a CSV being appended (lines ending in a newline, less the header)."""
    try:
        with open(path, "rb") as f:
            return max(0, f.read().count(b"\n") - 1)
    except OSError:
        return 0


class Watch:
    """A background thread that draws one bar over several runs, from their growing rounds.csv.

    ``runs``: (path of the run's rounds.csv, its number of rounds T) per job. The bar counts
    rounds over all jobs (so the ETA is the rounds still to train at the rate so far); a job
    reported :meth:`finished` counts all its rounds. Jobs finished before the watch started
    (``already``) count as done and stay out of the rate. Used by sweeps, whose jobs run in
    this process or in worker processes: either way their rounds.csv grows round by round.
    """

    def __init__(self, runs: list[tuple[str, int]], label: str, already: set[int] | None = None,
                 interval: float = 0.5) -> None:
        import threading

        self.runs, self.interval = runs, interval
        self.done: set[int] = set(already or ())
        start = sum(runs[i][1] for i in self.done)
        self.bar = bar(sum(t for _, t in runs), label, unit="rounds", start=start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.bar.mode is not None else None

    def rounds_done(self) -> tuple[int, str]:
        with self._lock:
            done = set(self.done)
        total, running, certifying = 0, [], 0
        for i, (path, T) in enumerate(self.runs):
            if i in done:
                total += T
                continue
            n = min(_rows_in(path), T)
            total += n
            if 0 < n < T:
                running.append(f"{n}/{T}")
            certifying += n == T
        detail = f"runs {len(done)}/{len(self.runs)}"
        if running:
            detail += "; running " + ", ".join(running[:4]) + (" ..." if len(running) > 4 else "")
        if certifying:
            detail += f"; certifying {certifying}"
        if len(done) < len(self.runs):  # the bar ends when the last run is done, certification included
            total = min(total, self.bar.total - 1)
        return total, detail

    def draw(self) -> None:
        n, detail = self.rounds_done()
        with self._lock:
            self.bar.update(n, detail)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw()

    def finished(self, i: int) -> None:
        with self._lock:
            self.done.add(i)
        if self.bar.mode is not None:
            self.draw()

    def __enter__(self) -> "Watch":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()
