"""Progress of long work shows without a terminal (CI logs, nohup, pipes), where tqdm hides its bar."""

from __future__ import annotations

import io

from align.core.progress import Progress, progress


def test_lines_without_a_terminal():
    out = io.StringIO()  # not a TTY
    with Progress(4, "generating", unit="prompts", every=0.0, stream=out) as bar:
        for _ in range(4):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[align] generating: 1/4 prompts in ") and "s left" in lines[0]
    assert lines[3].startswith("[align] generating: 4/4 prompts in ")
    assert lines[-1].endswith("(done)")


def test_short_work_prints_no_closing_line_and_other_ranks_stay_quiet(monkeypatch):
    out = io.StringIO()
    with Progress(3, "judging", every=3600.0, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""  # nothing was due before it finished
    monkeypatch.setenv("RANK", "1")
    quiet = io.StringIO()
    with Progress(2, "judging", every=0.0, stream=quiet) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_progress_yields_every_item_and_counts_them(capsys):
    assert list(progress(range(5), "reading", every=0.0)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "[align] reading: 5/5 it in" in err
