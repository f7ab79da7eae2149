"""Observability: progress lines when not on a terminal (labelled by stage, rate-limited, with ETA, always the last
one), interrupting a loop, stage summary lines, the flow run's Markdown artifact and the MLflow runs link."""
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


def test_interrupt_stops_the_loop_at_its_next_step(capsys, monkeypatch):
    import pytest

    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 3600.0)
    monkeypatch.setattr(progress_module, "STOP", progress_module.threading.Event())
    done = 0
    with pytest.raises(progress_module.StopRequested, match=r"\[sft/a/seed0\] train steps: interrupted at 2/5"):
        with stage_label("sft/a/seed0"), progress("train steps", 5) as bar:
            for step in range(5):
                if step == 2:
                    progress_module.STOP.set()  # what the CLI's SIGINT/SIGTERM handler does
                bar.advance()
                done += 1
    assert done == 2


def test_stage_summary_line(capsys):
    progress_module.stage_done("rl/pmishift/seed0", "computed", {"accuracy": 0.41234, "steps": 60})
    assert capsys.readouterr().err == "[rl/pmishift/seed0] computed  accuracy=0.4123  steps=60\n"


def test_summary_artifact_markdown_has_verdict_counts_stages_and_links():
    from flows.artifacts import summary_markdown

    result = {"ablation": "tiny", "home": "/h", "stages": {"sft/control/seed0": "computed", "data/*": "cached"},
              "summaries": {"sft/control/seed0": {"loss": 0.5}}, "ledger": {"✓": 7, "✗": 1, "☐": 2},
              "violated": ["same prompts"], "report": "/h/reports/tiny/report.html"}
    md = summary_markdown(result, "http://127.0.0.1:5000/#/experiments/3/runs")
    assert "**Verdict:** ✗ violated: same prompts" in md
    assert "| 7 | 1 | 2 |" in md and "| `sft/control/seed0` | computed | loss=0.5 |" in md
    assert "[http://127.0.0.1:5000/#/experiments/3/runs](http://127.0.0.1:5000/#/experiments/3/runs)" in md
    assert "(file:///h/reports/tiny/report.html)" in md


def test_mlflow_link_is_the_experiment_runs_view(monkeypatch):
    from infra.tracking import runs_url

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert runs_url("3") == "http://127.0.0.1:5000/#/experiments/3/runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.lab:8443/")
    assert runs_url("3") == "https://mlflow.lab:8443/#/experiments/3/runs"
