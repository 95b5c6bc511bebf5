"""What a person sees while an abpipe command runs, in one place (a shared service of every command).

- `note` / `warn`: abpipe's own lines, once each, printed above any live progress bar;
- `progress`: a tqdm bar on a terminal; off one (CI, `ray job logs`, a pipe) the same figures as a
  plain line every `ABPIPE_PROGRESS_INTERVAL` seconds (default 30) when something moved, at most one
  every 30 s (or the interval) while nothing does (its elapsed time shows it is alive), and one at the
  end, no carriage returns;
- `remote_progress` + `StepReporter`: the training loop runs in a Ray Train worker, whose output
  does not reach this process once Ray's worker logs stay in their files (`log_to_driver=False`).
  Rank 0 pushes its step, loss and rate (a few times a second, values it already has on the host)
  to a tiny named actor; a thread of the driver polls it while `TorchTrainer.fit()` blocks.
  (`ray.experimental.tqdm_ray` was the alternative: it ships its state as magic lines in the
  worker's stdout, so it needs `log_to_driver` on, the very stream we turn off.)
- `summary`: the compact table every command ends with; `error`: one line on stderr.

With `--json`, stdout carries only the result document: everything here then goes to stderr.
`--verbose` brings Ray's own logs back to the console (see pipeline.runtime.init_ray).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TextIO

from tqdm import tqdm

PREFIX = "[abpipe]"
INTERVAL_ENV = "ABPIPE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
UNCHANGED_INTERVAL_S = 30.0  # off a TTY, the same state again: no more often than this (or the interval)
NAMESPACE = "abpipe"  # the Ray namespace of the progress actors
_PLAIN = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@dataclass
class _Settings:
    verbose: bool = False
    json: bool = False
    pinned: TextIO | None = None  # while `captured` swaps sys.stdout/stderr: the console's own stream


_settings = _Settings()


@contextlib.contextmanager
def configured(verbose: bool = False, json_output: bool = False) -> Iterator[None]:
    """For one command (the CLI): how loud it is and whether stdout is reserved for `--json`.

    abpipe's own `logging` warnings (eval, sweep, tracking) print as notes meanwhile. The previous
    settings come back afterwards, so a command run in-process (tests, notebooks) leaves no trace.
    """
    saved = (_settings.verbose, _settings.json)
    _settings.verbose, _settings.json = verbose, json_output
    if not verbose:  # MLflow's INFO lines (database set-up, run links) belong to its logger, not the console
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logger = logging.getLogger("abpipe")
    handler, level, propagate = _NoteHandler(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        _settings.verbose, _settings.json = saved


def verbose() -> bool:
    return _settings.verbose


def stream() -> TextIO:
    """Where human output goes, looked up at each write (tests swap sys.stdout)."""
    if _settings.pinned is not None:
        return _settings.pinned
    return sys.stderr if _settings.json else sys.stdout


def is_tty() -> bool:
    try:
        return stream().isatty()
    except (AttributeError, ValueError):
        return False


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def note(message: str) -> None:
    """One of abpipe's own lines; printed above a live bar rather than through it."""
    tqdm.write(f"{PREFIX} {message}", file=stream())
    stream().flush()


def warn(message: str) -> None:
    note(f"WARNING: {message}")


def error(message: str) -> None:
    """The one line a failed command leaves on stderr."""
    print(f"abpipe: {message}", file=sys.stderr, flush=True)


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            note(text if record.levelno < logging.WARNING else f"{record.levelname}: {text}")
        except Exception:  # a logging handler must never raise into the caller
            self.handleError(record)


# ------------------------------------------------------------------------------------------ progress


def _postfix(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


_live_bars: list["Progress"] = []  # open TTY bars, outermost first


class Progress:
    """A progress display: a tqdm bar on a TTY, plain periodic lines elsewhere.

    `update(n)` adds, `goto(n)` sets the count; keyword arguments become the postfix (loss 8.1, ...).
    `mark_start()` restarts the rate clock, so that a slow start-up (Ray Train's workers, the data
    pipeline) does not make the steps after it look slow.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = initial
        self.fields: dict[str, Any] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._tty = is_tty()
        self._bar = None
        if self._tty:
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=stream(),
                dynamic_ncols=True,
                mininterval=0.5,
                leave=not _live_bars,  # a bar inside another (eval's inside a sweep's) clears when done
            )
            _live_bars.append(self)
        self._start = time.monotonic()
        self._clock = (self._start, initial)  # (time, n) the rate is measured from
        self._last_line = self._start

    def update(self, n: int = 1, **fields: Any) -> None:
        with self._lock:
            self._goto(self.n + n, fields)

    def goto(self, n: int, **fields: Any) -> None:
        with self._lock:  # the bar of a thread pool (cc12m's normaliser) is fed from several threads
            self._goto(n, fields)

    def _goto(self, n: int, fields: dict[str, Any]) -> None:
        changed = any(self.fields.get(k) != v for k, v in fields.items())  # a poller re-sends the same state
        if fields:
            self.fields.update(fields)
        now = time.monotonic()
        advanced, self.n = n - self.n, n
        if self._bar is not None:
            if fields:
                self._bar.set_postfix_str(_postfix(self.fields), refresh=False)
            if advanced > 0:
                self._bar.update(advanced)
            else:
                self._bar.refresh()
        else:
            since, every = now - self._last_line, _interval()
            if since >= every and (advanced > 0 or changed) or fields and since >= max(every, UNCHANGED_INTERVAL_S):
                self._print_line(now)

    def mark_start(self) -> None:
        """The work proper starts now: measure the rate (and ETA) from here."""
        with self._lock:
            self._clock = (time.monotonic(), self.n)
            if self._bar is not None:
                self._bar.unpause()  # tqdm's next rate sample then spans from now, not from its creation

    def tick(self) -> None:
        """Redraw (elapsed time) without progress: on a TTY only."""
        if self._bar is not None:
            self._bar.refresh()

    def _rate(self, now: float) -> float | None:
        t0, n0 = self._clock
        return (self.n - n0) / (now - t0) if now - t0 >= 1.0 and self.n > n0 else None  # no rate from a blip

    def line(self) -> str:
        now = time.monotonic()
        return tqdm.format_meter(
            self.n,
            self.total,
            now - self._start,
            prefix=self.desc,
            unit=self.unit,
            rate=self._rate(now),
            postfix=_postfix(self.fields) or None,
            bar_format=_PLAIN if self.total else None,
        )

    def _print_line(self, now: float) -> None:
        self._last_line = now
        print(f"{PREFIX} {self.line()}", file=stream(), flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            _live_bars.remove(self)
        else:
            self._print_line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(desc: str, total: int | None = None, unit: str = "it", initial: int = 0) -> Progress:
    return Progress(desc, total, unit, initial)


# ------------------------------------------------------------------ progress from Ray Train workers


class ProgressBoard:
    """The actor between rank 0 and the driver: the latest state plus notes not yet shown."""

    def __init__(self):
        self._state: dict[str, Any] = {}
        self._notes: list[str] = []

    def push(self, state: dict[str, Any]) -> None:
        self._state.update(state)

    def note(self, text: str) -> None:
        self._notes.append(text)

    def take(self) -> tuple[dict[str, Any], list[str]]:
        notes, self._notes = self._notes, []
        return dict(self._state), notes


def _show(bar: Progress, state: dict[str, Any], notes: list[str]) -> None:
    for text in notes:
        note(text)
    if "step" in state:
        bar.goto(int(state["step"]), loss=state.get("loss"), **{"views/s": state.get("views_per_s")})
    else:
        bar.tick()


def board_name() -> str:
    """A fresh name for the progress actor of one run (handed to the workers in their loop config)."""
    return f"abpipe-progress-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def remote_progress(
    name: str, desc: str, total: int, unit: str = "step", initial: int = 0, poll_s: float = 0.5
) -> Iterator[None]:
    """A bar fed by a loop in other Ray processes through the actor `name` (their `StepReporter`)."""
    import ray

    board = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).options(name=name, namespace=NAMESPACE).remote()
    bar = Progress(desc, total, unit, initial)
    stop = threading.Event()
    stepping = False

    def drain() -> bool:
        nonlocal stepping
        try:
            state, notes = ray.get(board.take.remote(), timeout=30)
        except Exception:  # the board is gone (shutdown, crash): the run's own error says why
            return False
        if "step" in state and not stepping:  # the workers are up and stepping: the rate counts from here
            stepping = True
            bar.mark_start()
        _show(bar, state, notes)
        return True

    def poll() -> None:
        while not stop.wait(poll_s) and drain():
            pass

    thread = threading.Thread(target=poll, name="abpipe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


class StepReporter:
    """The training loop's side of the bar (and of its notes).

    In a Ray Train worker with a board: rank 0 pushes (step, loss, views/s) at most every
    `every_s`, and on the last step; the loss is the one already logged on logging steps, so no
    step waits for the device. Logging steps also leave the classic one-line record in the
    worker's log (Ray's log files). Without a board (the loop run in-process) the lines are notes.
    """

    def __init__(self, board: str | None, rank: int, total: int, every_s: float = 0.5):
        self.rank, self.total, self.every_s = rank, total, every_s
        self._name = board
        self._board = None
        self._last = -math.inf
        self._log = logging.getLogger("abpipe.train")

    def _send(self, method: str, payload: Any) -> None:
        """Fire and forget; a board that cannot be reached (its node died) only costs the bar, never the run."""
        try:
            if self._board is None:
                import ray

                self._board = ray.get_actor(self._name, namespace=NAMESPACE)
            getattr(self._board, method).remote(payload)
        except Exception as exc:
            self._log.warning("progress board %s unreachable (%s); the console bar stops here", self._name, exc)
            self._name = None

    def step(self, step: int, views_seen: int, metrics: dict[str, Any] | None = None) -> None:
        if self.rank != 0:
            return
        state: dict[str, Any] = {"step": step, "total": self.total, "views_seen": views_seen}
        if metrics:
            state.update(loss=metrics.get("loss"), views_per_s=metrics.get("views_per_s"))
            self._record(step, views_seen, metrics)
        now = time.monotonic()
        if self._name and (now - self._last >= self.every_s or step >= self.total or metrics):
            self._last = now
            self._send("push", state)

    def note(self, text: str, warning: bool = False) -> None:
        """A line for the person running the command: in the worker's log, and rank 0's also via the board."""
        if not self._name:
            if self.rank == 0:
                (warn if warning else note)(text)
            return
        self._log.log(logging.WARNING if warning else logging.INFO, text)
        if self.rank == 0:
            self._send("note", f"WARNING: {text}" if warning else text)

    def _record(self, step: int, views_seen: int, metrics: dict[str, Any]) -> None:
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
        get = metrics.get
        line = (
            f"step {step}/{self.total} views {views_seen:,} loss {get('loss', float('nan')):.4f} ({terms}) "
            f"lr {get('lr', 0.0):.2e} ema {get('ema_rate', 0.0):.5f} {get('views_per_s', 0.0):.0f} views/s"
        )
        if self._name:
            self._log.info(line)
        else:
            note(line)


# ---------------------------------------------------------------------------------------- summaries


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Rows as aligned text columns: the first left-aligned, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    head = [list(header)] if header else []
    width = max((len(r) for r in head + cells), default=0)
    sizes = [max((len(r[i]) for r in head + cells if i < len(r)), default=0) for i in range(width)]
    numeric = [
        i > 0 and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows if i < len(row))
        for i in range(width)
    ]

    def fmt(row: list[str]) -> str:
        return "  ".join((c.rjust(sizes[i]) if numeric[i] else c.ljust(sizes[i])) for i, c in enumerate(row)).rstrip()

    lines = [fmt(r) for r in head]
    if head:
        lines.append("  ".join("-" * s for s in sizes))
    return "\n".join(lines + [fmt(r) for r in cells])


def summary(title: str, rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> None:
    """The compact table a command ends with."""
    text = f"\n== {title} ==\n{table(rows, header)}"
    tqdm.write(text, file=stream())
    stream().flush()


@contextlib.contextmanager
def captured(path: str) -> Iterator[None]:
    """Send a chatty library's own prints (stdout and stderr of this process) to `path`, unless verbose.

    abpipe's own lines keep going to the console stream that was current on entry.
    """
    if _settings.verbose:
        yield
        return
    console = stream()
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        _settings.pinned = console
        try:
            yield
        finally:
            _settings.pinned = None
