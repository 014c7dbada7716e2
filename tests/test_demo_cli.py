"""`twigvlm demo` (the main job) and `--model demo` / `--twig demo` when the demo's trained parts are absent."""

from __future__ import annotations

import pytest

from twigvlm.cli.main import main
from twigvlm.demo import model as demo_model


@pytest.fixture
def no_assets(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_model, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(demo_model, "TWIG_DIR", tmp_path / "assets" / "twig")


def test_demo_without_trained_parts_runs_the_main_job_on_a_tiny_model(no_assets, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "tiny random LLaVA" in out and "HF generate" in out and "TTP + SSD" in out and "× HF" in out
    assert "of drafted tokens accepted" in out and "kept 6/16 visual tokens" in out
    same = "same text as HF" in out
    assert f"TTP + SSD kept HF's answer on {int(same)} of 1 requests, keeping 37.5% of the visual tokens" in out
    assert (tmp_path / "out" / "kept-describe.png").is_file()


@pytest.mark.parametrize(
    "argv,why",
    [
        (["generate", "--model", "demo", "--prompt", "hi"], "vision weights"),
        (["train", "--model", "demo", "--data", __file__, "--out", "x"], "vision weights"),  # a data file that exists
    ],
)
def test_model_demo_without_assets_says_how_to_build(no_assets, capsys, argv, why):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert why in err and "python -m twigvlm.demo.build" in err and err.count("\n") == 1


def test_twig_demo_without_assets_says_how_to_build(no_assets, capsys, model_dirs):
    assert main(["generate", "--model", model_dirs["llama-clip"], "--twig", "demo", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "demo twig" in err and "python -m twigvlm.demo.build" in err


def test_the_closing_line_counts_the_answers_kept():
    from twigvlm.demo.run import Comparison, summary

    def c(text: str, kept: int | None) -> Comparison:
        return Comparison("x", "q", "a red circle", 3, 1.0, text, 3, 0.5, 0.5, kept, 576)

    line = summary([c("a red circle", 64), c("a blue circle", 64), c("a red circle", 64)])
    assert (
        line == "TTP + SSD kept HF's answer on 2 of 3 requests, keeping 11.1% of the visual tokens in the deep layers"
    )
    assert summary([c("a red circle", None)]) == "TTP + SSD kept HF's answer on 1 of 1 requests"
