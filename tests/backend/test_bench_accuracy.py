"""`asymkd bench accuracy --ablation` on tiny data: one run folder per row, each row the
part it names."""

from __future__ import annotations

import json
import sys

import pytest

from asymkd.cli import main
from tiny_data import make_dataset

TINY = ["teacher.backbone=resnet18_w16", "teacher.epochs=1", "teacher.folds=2", "teacher.batch_size=8",
        "teacher.min_steps=1", "teacher.input_size=0", "matcher.backbone_ms=resnet18_w16",
        "matcher.backbone_rgb=resnet18_w16", "matcher.epochs=1", "matcher.batch_size=8", "matcher.embed_dim=16",
        "distill.backbone=resnet18_w16", "distill.epochs=1", "distill.min_steps=1", "distill.batch_size=8",
        "distill.attention_dim=16", "distill.attention_heads=2", "distill.input_size=0"]


def test_ablation_rows_train_what_they_name(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n_ms=4, n_rgb=4)
    out = tmp_path / "bench"
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Earlier\n\nhand-written history\n")
    argv = ["bench", "accuracy", "--data", str(data["ms"].parent), "--out", str(out), "--labels", "6",
            "--seeds", "1", "--ablation", "--device", "cpu", "--markdown", str(md), "--set", *TINY]
    assert main(argv) == 0
    table = capsys.readouterr().out.split("Ablation at 6 RGB labels")[1]
    # --markdown: the tables as a section before the hand-written history, replaced on a rerun
    text = md.read_text()
    assert text.index("## Generated results") < text.index("| labels | seeds | baseline OA") < text.index("## Earlier")
    assert "| + MS samples as RGB rows (ground truth only) |" in text and "hand-written history" in text
    assert "--out" not in text.split("<!-- section: ")[1].split("-->")[0]  # where it worked is no key
    assert main(argv) == 0  # finished runs are reused
    assert md.read_text().count("<!-- section: asymkd bench accuracy") == 1
    # --unlabeled trains its own runs (not the labeled-only ones), and a finished run is
    # reused only with the settings it was trained with
    assert main([*argv[:argv.index("--ablation")], "--unlabeled", "--device", "cpu", "--set", *TINY]) == 0
    assert (out / "main-unlabeled" / "labels6-seed0" / "student" / "metrics.json").is_file()
    assert main([*argv, "distill.w_gt=0.5"]) == 2
    assert "trained with other settings" in capsys.readouterr().err
    for row in ("GT only (baseline)", "+ MS samples as RGB rows (ground truth only)",
                "+ soft labels, random same-class partner", "+ attention and domain term (full)"):
        assert row in table, row

    def student(folder):
        return json.loads((out / folder / "labels6-seed0" / "student" / "metrics.json").read_text())

    base = json.loads((out / "main" / "labels6-seed0" / "baseline" / "metrics.json").read_text())
    assert base["summary"]["ms_rows"] == 0  # the baseline: RGB alone
    rows_only = student("ablation-msrows")
    assert rows_only["summary"]["ms_rows"] == 12  # 3 classes x 4 MS samples, as RGB rows
    assert all(h["train_pseudo"] == 0 and "train_feat" not in h for h in rows_only["history"])
    assert student("ablation-random")["history"][0]["train_pseudo"] > 0
    full = student("main")
    assert full["summary"]["ms_rows"] == 12 and full["history"][0]["train_feat"] > 0


def test_bench_flags_come_from_the_arguments_given(capsys, monkeypatch):
    """`cli.main([...])` from Python: the benchmark named in its arguments, not in the
    process's own command line, gets its flags."""
    monkeypatch.setattr(sys, "argv", ["pytest"])
    with pytest.raises(SystemExit) as done:
        main(["bench", "classify", "--help"])
    assert done.value.code == 0
    assert "--workers" in capsys.readouterr().out
