"""`asymkd bench ... --markdown`: one section per command, replaced in place."""

from __future__ import annotations

import pytest

from asymkd.bench import record
from asymkd.errors import DataError


def _recorded(text: str) -> record.Recording:
    with record.recording() as rec:
        print(text)
        record.table(record.markdown_table(["a", "b"], [["1", "2"]]))
    return rec


def test_a_rerun_replaces_its_section_and_keeps_the_rest(tmp_path, capsys):
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Earlier\n\nhistory\n")
    record.write(md, "asymkd bench train", _recorded("first"))
    record.write(md, "asymkd bench classify", _recorded("other"))
    record.write(md, "asymkd bench train", _recorded("second"))
    text = md.read_text()
    assert text.count("<!-- section: asymkd bench train -->") == 1
    assert "second" in text and "first" not in text and "other" in text
    assert text.index("bench train") < text.index("bench classify") < text.index("## Earlier")
    assert text.endswith("history\n") and "| 1 | 2 |" in text
    assert "second" in capsys.readouterr().out  # still printed while recorded


def test_the_key_leaves_out_where_a_benchmark_works():
    argv = ["--data", "d", "--out", "/tmp/x", "--markdown=f.md", "--labels", "40", "--events", "-"]
    assert record.command_line("accuracy", argv) == "asymkd bench accuracy --data d --labels 40"


def test_a_file_that_cannot_take_the_section_is_refused_before_the_run(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        record.check(tmp_path / "missing" / "b.md")
    with pytest.raises(DataError, match="folder"):
        record.check(tmp_path)
    bad = tmp_path / "bad.md"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="cannot read"):
        record.check(bad)
    record.check(tmp_path / "new.md")  # a new file is fine
