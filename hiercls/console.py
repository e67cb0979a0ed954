"""What the commands print while they work: rich in a terminal, plain lines in a log.

In a terminal, progress bars redraw in place and long lines wrap at the window's width. In a
log (output redirected to a file or a pipe, a dumb terminal, a CI runner) the same bars would
leave a blank line each time they stop, text would be cut into 80-column pieces, and a long
epoch would show nothing until its end. So when the console's stream is not a terminal:

* ``make_console`` gives a console that never wraps (``soft_wrap``, and wide enough that
  tables and their titles stay on one line; a rule keeps a terminal's width);
* ``bars_enabled`` is false: callers turn their rich progress bars off;
* ``EpochProgress`` prints one plain line every ``log_interval()`` seconds while a training
  unit's epoch runs (step/total, images/s, running loss); in a terminal it is a bar that shows
  the running loss from the first steps on;
* ``TaskProgress`` does the same for counted work (decoding, predicting, Grad-CAM): a bar in a
  terminal, a ``done/total, rate, elapsed`` line every ``log_interval()`` seconds in a log.

The interval is ``DEFAULT_LOG_INTERVAL_S`` (30 s); the environment variable
``HIERCLS_LOG_INTERVAL`` sets another (seconds; 0 turns the lines off).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from hiercls.errors import ConfigError

__all__ = [
    "DEFAULT_LOG_INTERVAL_S", "LOG_INTERVAL_ENV", "EpochProgress", "TaskProgress", "bars_enabled", "is_log",
    "log_interval", "make_console",
]

DEFAULT_LOG_INTERVAL_S = 30.0
LOG_INTERVAL_ENV = "HIERCLS_LOG_INTERVAL"
#: Width of a log console: wide enough that no line of hiercls's output is ever wrapped.
LOG_WIDTH = 4096
#: Width of a rule (``console.rule``) in a log, which would otherwise span LOG_WIDTH.
LOG_RULE_WIDTH = 100
#: Steps after which the terminal bar reads the running loss before the trainer's first check.
EARLY_STEPS = frozenset({1, 2, 4, 8, 16})
#: Seconds between two readings of the running loss for the terminal bar (each waits for the device).
BAR_LOSS_SECONDS = 2.0


class _LogConsole(Console):
    """A console for logs: no wrapping, and rules as wide as a terminal's."""

    def rule(self, title="", *, characters: str = "─", style="rule.line", align="center") -> None:
        from rich.rule import Rule

        width = max(LOG_RULE_WIDTH, len(str(title)) + 10)
        self.print(Rule(title, characters=characters, style=style, align=align), width=width)


def is_log(console: Console) -> bool:
    """Whether ``console`` writes to a log (a file, a pipe, a dumb terminal), not a live terminal."""
    return not console.is_jupyter and (not console.is_terminal or console.is_dumb_terminal)


def make_console(*, stderr: bool = True, quiet: bool = False, force_terminal: bool | None = None) -> Console:
    """The console of a command: rich's own in a terminal, one that never wraps in a log."""
    console = Console(stderr=stderr, quiet=quiet, force_terminal=force_terminal)
    if not is_log(console):
        return console
    return _LogConsole(stderr=stderr, quiet=quiet, force_terminal=force_terminal, width=LOG_WIDTH, soft_wrap=True)


def bars_enabled(console: Console | None, wanted: bool = True) -> bool:
    """Whether rich progress bars should be drawn on ``console`` (``None``: rich's default, stdout).

    Never in a log: a stopped bar leaves a blank line there and shows nothing while it runs.
    """
    if not wanted:
        return False
    console = console if console is not None else Console()
    return not console.quiet and not is_log(console)


def log_interval() -> float:
    """Seconds between two progress lines in a log (``math.inf``: none)."""
    text = os.environ.get(LOG_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_LOG_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise ConfigError(f"{LOG_INTERVAL_ENV}={text!r}: give the seconds between progress lines in a log "
                          f"(a number >= 0; 0 turns them off; default {DEFAULT_LOG_INTERVAL_S:g})")
    return math.inf if seconds == 0 else seconds


class EpochProgress:
    """The progress of one training unit's epoch: a bar in a terminal, a line now and then in a log.

    ``running_loss()`` is called only when a number is shown (it may wait for the device): in a
    terminal after the first steps (``EARLY_STEPS``) and then every ``BAR_LOSS_SECONDS``; in a
    log once per ``log_interval()``.
    """

    def __init__(self, console: Console, description: str, total: int, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.description, self.total, self.clock = console, description, total, clock
        self.log = enabled and is_log(console) and not console.quiet
        self.interval = log_interval() if self.log else math.inf
        self.bar: Progress | None = None
        if enabled and not self.log:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=True, disable=console.quiet,
            )
        self.done = self.first = self.images = 0
        self.started = self.last_shown = self.clock()

    def start(self, done: int = 0) -> None:
        """Show the bar (in a terminal); ``done`` steps of the epoch were trained before (resuming)."""
        self.done = self.first = done
        self.started = self.last_shown = self.clock()
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total, loss="-", rate="-")
            self.bar.advance(self.task, done)

    def step(self, images: int, running_loss: Callable[[], float]) -> None:
        """One more step of ``images`` images; ``running_loss()`` gives the epoch's mean loss so far."""
        self.done += 1
        self.images += images
        now = self.clock()
        if self.bar is not None:
            self.bar.advance(self.task, 1)
            if self.done - self.first in EARLY_STEPS or now - self.last_shown >= BAR_LOSS_SECONDS:
                self.show_loss(running_loss(), now)
        elif self.log and now - self.last_shown >= self.interval and self.done < self.total:
            self.console.print(self.line(running_loss(), now), highlight=False, markup=False)
            self.last_shown = now

    def show_loss(self, loss: float, now: float | None = None) -> None:
        """Put ``loss`` (and the current rate) on the bar."""
        now = self.clock() if now is None else now
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{loss:.4f}", rate=f"{self.rate(now):.0f}")
        self.last_shown = now

    def rate(self, now: float) -> float:
        return self.images / max(1e-9, now - self.started)

    def line(self, loss: float, now: float) -> str:
        """The log line: where the epoch is, how fast it goes, the running loss."""
        return (f"{self.description}: step {self.done}/{self.total}, {self.rate(now):.1f} img/s, "
                f"loss {loss:.4f}, {now - self.started:.0f} s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class TaskProgress:
    """Progress of counted work (images decoded, predicted, hashed): a bar in a terminal, a line
    now and then in a log.

    A drop-in for the part of ``rich.progress.Progress`` the commands use (a context manager,
    ``add_task``, ``advance``). In a terminal it is rich's transient bar; in a log (see
    ``is_log``) it prints ``description: done/total, rate/s, elapsed`` every ``log_interval()``
    seconds, so a long prediction is not silent until its end. ``enabled=False`` (``--no-progress``)
    shows neither. ``console`` defaults to a stderr console.
    """

    def __init__(self, console: Console | None = None, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console if console is not None else make_console(stderr=True)
        self.clock = clock
        self.log = enabled and is_log(self.console) and not self.console.quiet
        self.interval = log_interval() if self.log else math.inf
        self.bar: Progress | None = None
        if not self.log:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=self.console, transient=True, disable=not enabled or self.console.quiet,
            )
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> TaskProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def add_task(self, description: str, total: int) -> int:
        if self.bar is not None:
            return int(self.bar.add_task(description, total=total))
        now = self.clock()
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "done": 0, "started": now, "shown": now}
        return task

    def advance(self, task: int, amount: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(task, amount)
            return
        state = self.tasks[task]
        state["done"] += amount
        now = self.clock()
        if self.log and now - state["shown"] >= self.interval and state["done"] < state["total"]:
            elapsed = now - state["started"]
            rate = state["done"] / max(1e-9, elapsed)
            self.console.print(f"{state['description']}: {state['done']}/{state['total']}, {rate:.1f}/s, "
                               f"{elapsed:.0f} s", highlight=False, markup=False)
            state["shown"] = now
