"""The one status line (llmjax/progress.py) that training and prepare share: its ETA by hand, and
what it writes to a terminal and to a log."""

import io

import pytest

from llmjax import progress
from llmjax.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hms_and_bar():
    assert progress.hms(3723.9) == "1:02:03" and progress.hms(float("inf")) == "?"
    assert progress.bar(0.5) == "[" + "#" * 15 + "-" * 15 + "]"
    assert progress.bar(1.7) == "[" + "#" * 30 + "]" and progress.bar(-1) == "[" + "-" * 30 + "]"


def test_eta_counts_only_what_this_process_did(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    # Resumed at 40%: 10% more in 60 s leaves 50% at the same rate, 300 s.
    p = Progress(io.StringIO(), log_every=None, start_fraction=0.4)
    now[0] += 60
    assert p.eta(0.5) == pytest.approx(300.0)
    assert p.eta(0.4) == float("inf")  # nothing done yet: unknown, not zero


def test_log_lines_every_log_every_seconds_and_the_last_always(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    out = io.StringIO()
    p = Progress(out, log_every=30.0)
    for t in (1, 10, 31, 40, 62):
        now[0] = t
        p.update(f"at {t}", t / 100)
    p.update("finished", done=True)
    lines = out.getvalue().splitlines()
    # t=1 (the first), 31 and 62 (30 s apart), then the last; ETA = elapsed * (1 - f) / f.
    assert lines == ["at 1, ETA 0:01:39", "at 31, ETA 0:01:09", "at 62, ETA 0:00:38", "finished"]
    assert "\r" not in out.getvalue()


def test_terminal_redraws_in_place_and_quiet_processes_print_nothing(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    tty = Terminal()
    p = Progress(tty, log_every=None)
    now[0] = 10.0
    p.update("a", 0.5)
    now[0] = 10.1
    p.update("b", 0.6)  # within REDRAW_SECONDS: skipped
    now[0] = 11.0
    p.update("c", done=True)
    p.clear()
    assert tty.getvalue() == "\ra, ETA 0:00:10\x1b[K" + "\rc\x1b[K\n" + "\r\x1b[K"
    quiet = Terminal()
    q = Progress(quiet, log_every=30.0, enabled=False)
    q.update("x", 0.5, done=True)
    q.clear()
    assert quiet.getvalue() == ""
