"""The training progress line: it fits the terminal (epoch, loss, img/s and ETA always there), shows the newest
k-NN value, and log records printed while it is drawn each start on a line of their own."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from rich.console import Console

from cfmae_cli.cli import common
from cfmae_cli.cli.progress import TrainingView
from cfmae_cli.train.engine import Progress

_CODE = re.compile(r"\x1b\[(\??)([0-9;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: text, CR, LF, cursor up (``ESC[nA``) and erase line (``ESC[2K``)
    are acted on; colours and cursor hiding are ignored."""
    rows, row, col = [""], 0, 0
    for match in _CODE.finditer(raw):
        token = match.group(0)
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif match.group(3) == "A":
            row = max(0, row - int(match.group(2) or 1))
        elif match.group(3) == "K":
            rows[row] = ""
        elif not token.startswith("\x1b"):
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [r.rstrip() for r in rows if r.strip()]


def state(monitor_epoch: int = 35, batch: int = 30) -> Progress:
    """Epoch 40 of 40 of a CFMAE run, step 1234, with per-modality losses, α and a k-NN value."""
    values = {"type": "step", "step": 1234, "loss": 0.4321, "loss_rgb": 0.412, "loss_instance": 0.521,
              "loss_semantic": 0.333, "lr": 1.5e-4, "alpha_i": 0.5, "alpha_s": 0.25, "img_per_s": 123.4}
    monitor = {"type": "monitor", "epoch": monitor_epoch, "knn_top1_avg": 72.5, "knn_top1_token": 70.0}
    return Progress(epoch=40, epochs=40, batch=batch, batches=125, step=1234, images=150_000, values=values,
                    monitor=monitor)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drawn(width: int, last: Progress | None = None) -> tuple[list[str], TrainingView]:
    """The terminal of ``width`` columns after a view was updated twice (a minute apart) and closed."""
    out = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    clock = Clock()
    view = TrainingView(out, interactive=True, clock=clock)
    with view:
        view.update(state(batch=20))
        clock.now = 60.0
        view.update(last or state())
    return screen(out.file.getvalue()), view


@pytest.mark.parametrize("width", [80, 120, 200])
def test_progress_line_fits_the_terminal(width):
    lines, _ = drawn(width)
    assert lines and all(len(line) <= width for line in lines), lines
    line = lines[-1]
    # epoch, step, loss, img/s, ETA: 95 micro-batches left at 10 a minute → 9:30
    for field in ("epoch 40/40", "step 1234", "loss 0.4321", "123 img/s", "ETA 0:09:30"):
        assert field in line, (width, line)
    if width >= 200:
        for field in ("k-NN 72.5% (ep 35)", "[rgb 0.412 instance 0.521 semantic 0.333]", "lr 1.50e-04",
                      "α_I 0.50 α_S 0.25", "━"):
            assert field in line, line


def test_more_fields_on_a_wider_terminal():
    narrow, wide = drawn(80)[0][-1], drawn(200)[0][-1]
    assert len(wide.split()) > len(narrow.split()) + 8
    assert "k-NN" in narrow and "[rgb" not in narrow  # the fields of least priority go first


def test_the_newest_knn_value_is_shown():
    """The engine measures k-NN after an epoch's last step and puts it in the same state object: the line the
    run leaves behind shows it, not the one before."""
    last = state(monitor_epoch=35)
    out = Console(file=io.StringIO(), width=200, force_terminal=True)
    with TrainingView(out, interactive=True) as view:
        view.update(state(batch=20))
        view.update(last)
        last.monitor = {"type": "monitor", "epoch": 40, "knn_top1_avg": 75.0}  # as Trainer.monitor does
    assert "k-NN 75.0% (ep 40)" in screen(out.file.getvalue())[-1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal_logging(monkeypatch):
    """cfmae's logging as set up when stderr is a terminal, that terminal being the returned buffer (which
    stdout writes to as well)."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(common, "err_console", Console(file=term, width=80, force_terminal=True, stderr=True))
    logger = logging.getLogger("cfmae_cli")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = []
    common.setup(False)
    yield term
    logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_a_log_record_starts_on_its_own_line(terminal_logging):
    term = terminal_logging
    out = Console(file=term, width=80, force_terminal=True)
    with TrainingView(out, interactive=True) as view:
        view.update(state(batch=20))
        out.print("")  # a refresh: the line is on the terminal
        logging.getLogger("cfmae_cli.train.engine").info("epoch 39/40  loss 0.4400")
        view.update(state())
    lines = screen(term.getvalue())
    logged = [line for line in lines if "loss 0.4400" in line]
    assert logged and logged[0].startswith("INFO") and "img/s" not in logged[0], lines
    assert lines[-1].startswith("epoch 40/40"), lines  # the progress line stays below the record
    # the handler prints through its own console again once the line is gone
    assert logging.getLogger("cfmae_cli").handlers[0].console is common.err_console


def test_building_the_demo_data_is_announced_before_it_starts(tmp_path):
    """The first run builds the demo data (half a minute): one line says so, with an estimate, before."""
    from cfmae_cli.labeling.demo import build_demo_dataset, build_demo_monitor_set

    root, said = tmp_path / "demo", []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append((record.getMessage(), root.exists()))

    logger = logging.getLogger("cfmae_cli.labeling.demo")
    handler, level = Record(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        build_demo_dataset(root, crops_per_photo=1, size=32)
        build_demo_monitor_set(tmp_path / "monitor", train_per_photo=1, val_per_photo=1, size=32)
        build_demo_dataset(root, crops_per_photo=1, size=32)  # cached: nothing to announce
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    first, _ = said[0]
    assert first == f"building the demo dataset (8 images of 32 px): about a second, once; cached in {root}"
    assert not said[0][1] and said[1][0].startswith("demo dataset (8 images of 32 px) written to")
    assert said[2][0].startswith("building the demo monitor set (16 close-ups): about a second")
    assert [m for m, _ in said[4:]] == [f"demo dataset (8 images of 32 px) already at {root}"]
