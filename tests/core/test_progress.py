"""Progress bars: a live bar with its count, rate and ETA on a terminal; nothing off one."""

from __future__ import annotations

import io

from rich.console import Console

from kesi_dist.progress import bar


def test_a_bar_shows_count_and_eta_on_a_terminal_and_nothing_in_a_log(monkeypatch):
    monkeypatch.delenv("KESI_PROGRESS", raising=False)
    log = io.StringIO()
    with bar(Console(file=log, force_terminal=False), "epoch 1/3", total=10, unit="step") as b:
        for _ in range(10):
            b.advance()
    assert log.getvalue() == ""  # a log keeps its one line per epoch, no bar
    tty = io.StringIO()
    console = Console(file=tty, force_terminal=True, width=120)
    with bar(console, "epoch 1/3", total=10, unit="step") as b:
        for _ in range(4):
            b.advance()
        b.progress.refresh()
        shown = tty.getvalue()
    assert "epoch 1/3" in shown and "4/10" in shown and "ETA" in shown
    monkeypatch.setenv("KESI_PROGRESS", "0")  # switched off, even on a terminal
    quiet = io.StringIO()
    with bar(Console(file=quiet, force_terminal=True), "x", total=3) as b:
        b.advance(3)
    assert quiet.getvalue() == ""
