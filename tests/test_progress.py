"""Progress bars go to stderr, so `--json` output on stdout stays parseable."""

from quantscale import progress


def test_progress_bar_writes_to_stderr_only(capsys, monkeypatch):
    monkeypatch.setenv("QUANTSCALE_PROGRESS", "1")
    assert list(progress.track(range(3), total=3, description="work")) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "work" in captured.err and "3/3" in captured.err


def test_progress_can_be_silenced(capsys, monkeypatch):
    monkeypatch.setenv("QUANTSCALE_PROGRESS", "0")
    assert list(progress.track(range(2), description="quiet")) == [0, 1]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
