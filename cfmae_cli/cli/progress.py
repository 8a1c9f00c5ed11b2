"""Progress display for training: one live line on a terminal that fits its width, plain lines otherwise.

The live line always shows the epoch, the step, the loss, img/s and the ETA; the other fields appear when the
terminal has room for them, in the order of :data:`OPTIONAL` (the first one is the last to go)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from cfmae_cli.cli.common import logs_to
from cfmae_cli.train.engine import Progress as EngineProgress

#: The optional fields of the live line, most wanted first: when the terminal is narrow, they go from the end.
OPTIONAL = ("knn", "bar", "parts", "lr", "alpha", "elapsed")
#: Display order of all fields, left to right (the required ones included).
ORDER = ("epoch", "bar", "step", "loss", "parts", "alpha", "knn", "lr", "img_s", "elapsed", "eta")
BAR_MIN, BAR_MAX = 10, 40


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fields(state: EngineProgress, elapsed: float | None = None, eta: float | None = None) -> dict[str, str]:
    """The text of each field of ``state`` that has a value (the bar is drawn apart). ``k-NN`` is the newest
    monitor record's, with the epoch it was measured after."""
    values, monitor = state.values, state.monitor
    total = state.epochs * state.batches
    done = (state.epoch - 1) * state.batches + state.batch
    out = {"epoch": f"epoch {state.epoch}/{state.epochs}",
           "step": f"step {state.step} ({100 * done / total:.0f}%)" if total else f"step {state.step}"}
    if values:
        out["loss"] = f"loss {values['loss']:.4f}"
        parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in values.items() if k.startswith("loss_"))
        if parts:
            out["parts"] = f"[{parts}]"
        alpha = " ".join(f"{label} {values[key]:.2f}" for key, label in (("alpha_i", "α_I"), ("alpha_s", "α_S"))
                         if key in values)
        if alpha:
            out["alpha"] = alpha
        if "lr" in values:
            out["lr"] = f"lr {values['lr']:.2e}"
        if "img_per_s" in values:
            out["img_s"] = f"{values['img_per_s']:.0f} img/s"
    if monitor and "knn_top1_avg" in monitor:
        out["knn"] = f"k-NN {monitor['knn_top1_avg']:.1f}% (ep {monitor['epoch']})"
    if elapsed is not None:
        out["elapsed"] = _clock(elapsed)
    out["eta"] = f"ETA {_clock(eta)}"
    return out


def fit_line(parts: dict[str, str], width: int, fraction: float | None = None) -> str:
    """The fields of ``parts`` joined into one line of at most ``width`` columns: the required ones always
    (cut at the end when even they do not fit), then the optional ones in the order of :data:`OPTIONAL` while
    they fit; a progress bar of ``fraction`` takes at least :data:`BAR_MIN` columns and grows into what is left."""
    def size(keys: list[str], bar: int) -> int:
        texts = [Text(parts[k]).cell_len if k != "bar" else bar for k in keys]
        return sum(texts) + len(texts) - 1

    shown = [k for k in parts if k not in OPTIONAL]
    wanted = [k for k in OPTIONAL if k in parts or (k == "bar" and fraction is not None)]
    for key in wanted:
        if size(shown + [key], BAR_MIN) <= width:
            shown.append(key)
    bar = 0
    if "bar" in shown:
        bar = min(BAR_MAX, BAR_MIN + width - size(shown, BAR_MIN))
    pieces = [_bar(fraction or 0.0, bar) if k == "bar" else parts[k] for k in ORDER if k in shown]
    line = Text(" ".join(pieces))
    line.truncate(width, overflow="ellipsis")
    return line.plain


def _bar(fraction: float, width: int) -> str:
    full = max(0, min(width, int(fraction * width)))
    return "━" * full + "─" * (width - full)


class _Line:
    """The live line, composed at each refresh for the width the console gives it."""

    def __init__(self, view: "TrainingView"):
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(self.view.line(options.max_width), no_wrap=True, overflow="ellipsis")


class TrainingView:
    """Use as ``with TrainingView(console, interactive) as view: pretrain(cfg, run, view.update)``. On a
    terminal the line is redrawn a few times a second from the newest state (a k-NN value measured after the
    last step shows at once), and the cfmae log records are printed above it, each on its own line."""

    def __init__(self, console: Console, interactive: bool, clock: Any = time.monotonic):
        self.console = console
        self.interactive = interactive
        self.clock = clock
        self.state: EngineProgress | None = None
        self.live: Live | None = None
        self._stack = contextlib.ExitStack()
        self._start: tuple[float, int] | None = None  # (time, micro-batches done) of the first update
        self._last_step_logged: float | None = -1  # the "step" of the last line printed

    def __enter__(self) -> "TrainingView":
        if self.interactive:
            self._stack.enter_context(logs_to(self.console))
            # other text for stderr goes above the line too, unless stderr is not a terminal (a file keeps it)
            self.live = Live(_Line(self), console=self.console, refresh_per_second=4, transient=False,
                             redirect_stderr=sys.stderr.isatty())
            self._stack.enter_context(self.live)  # its last refresh, on leaving, shows the newest state
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def timing(self, state: EngineProgress) -> tuple[float | None, float | None]:
        """Seconds since the first update, and the estimated seconds left (None until a step was timed)."""
        total = state.epochs * state.batches
        done = (state.epoch - 1) * state.batches + state.batch
        now = self.clock()
        if self._start is None:
            self._start = (now, done)
            return 0.0, None
        elapsed = now - self._start[0]
        moved = done - self._start[1]
        return elapsed, (total - done) * elapsed / moved if moved > 0 else None

    def line(self, width: int) -> str:
        """The live line for ``width`` columns (empty before the first update)."""
        state = self.state
        if state is None:
            return ""
        elapsed, eta = self.timing(state)
        total = state.epochs * state.batches
        done = (state.epoch - 1) * state.batches + state.batch
        return fit_line(fields(state, elapsed, eta), width, done / total if total else None)

    def update(self, state: EngineProgress) -> None:
        self.state = state
        if self.live is not None:
            if self._start is None:
                self.timing(state)
            return
        if state.values and state.values.get("step") != self._last_step_logged:
            self._last_step_logged = state.values.get("step")
            parts = fields(state)
            self.console.print(" ".join(parts[k] for k in ORDER if k in parts and k not in ("elapsed", "eta")),
                               highlight=False, markup=False, soft_wrap=True)
