"""What a job prints off a terminal: plain progress lines, not redrawn bars."""
import io

from pipelines.line_cluster import PlainProgress


def test_plain_progress_prints_one_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    progress = PlainProgress(["a", "b"], {"a": 10, "b": None}, every_s=3600, stream=out)
    progress.update({"a": 4, "b": 2})  # within the interval: nothing
    assert out.getvalue() == ""
    progress.close()
    assert out.getvalue().endswith(": 6 frames (a 4/10, b 2)\n") and out.getvalue().count("\n") == 1
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no redrawing

    out = io.StringIO()
    every_update = PlainProgress(["a"], {"a": 3}, every_s=0, stream=out)
    every_update.update({"a": 1})
    every_update.update({"a": 3})
    assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == ["1 frames (a 1/3)", "3 frames (a 3/3)"]
