"""The progress line: what a person watching a long run sees."""

from __future__ import annotations

import io

from evomerge.runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_line_shows_rate_scores_failures_workers_and_eta():
    out = Terminal()
    Progress(1000, stream=out).update(500, 250.0, 0.9, 0.85, 2, "workers busy 2/2", force=True)
    line = out.getvalue()
    assert line.startswith("\r[############............] 500/1,000 evals  250/s")
    assert "best train 0.9000  test 0.8500  failed 2  workers busy 2/2  eta 0:00:02" in line


def test_log_file_gets_plain_lines_not_more_than_every_10_s():
    out = io.StringIO()
    progress = Progress(100, stream=out)
    progress.update(10, 5.0, None, None, 0)
    progress.update(20, 5.0, None, None, 0)  # within 10 s: skipped
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert "best train -  test -" in out.getvalue()
