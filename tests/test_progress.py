"""Progress lines when not on a terminal: labelled by stage, rate-limited, with ETA, and always the last one."""
from __future__ import annotations

import infra.progress as progress_module
from infra.progress import progress, stage_label


def test_plain_lines_name_the_stage_and_give_an_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 3600.0)  # only the final line is due
    with stage_label("rl/pmishift"), progress("GRPO steps", 4, start=1) as bar:
        for _ in range(3):
            bar.advance(acc=0.25)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1  # rate-limited: not one line per step
    assert lines[0].startswith("[rl/pmishift] GRPO steps 4/4  100%")
    assert "ETA 0s" in lines[0] and lines[0].endswith("acc=0.25")


def test_every_line_when_the_interval_is_zero(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    with progress("train steps", 3) as bar:
        for _ in range(3):
            bar.advance()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert lines[0].startswith("train steps 1/3  33%")  # no stage label outside a stage
