"""`twigvlm bench` on a tiny random model: every method runs and the outputs are well formed; `ar` scores exactly
as `hf` and matches it token for token; lossless pairs match; malformed task files name the file and line."""

from __future__ import annotations

import json

import pytest

import twigvlm
from twigvlm.bench.tasks import exact_match, from_files, normalize
from twigvlm.cli import main
from twigvlm.errors import TwigVLMError

from .conftest import random_image


@pytest.fixture(scope="module")
def bench_twig(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--out", str(out)]) == 0
    return str(out)


def _file_task(folder, vlm, n=3):
    """A LLaVA-format task whose gold answers are the stock model's own greedy outputs (so hf scores 1.0)."""
    (folder / "img").mkdir(parents=True)
    questions, answers = [], []
    for i in range(n):
        random_image(i).save(folder / "img" / f"{i}.png")
        text = ["what color is it?", "how many shapes?", "describe it"][i % 3]
        ids = vlm.adapter.hf_generate(text, [random_image(i).convert("RGB")], 4)
        eos = set(vlm.adapter.eos_token_ids)
        questions.append({"question_id": i, "image": f"{i}.png", "text": text})
        answers.append({"question_id": i, "answer": vlm.adapter.decode([t for t in ids if t not in eos])})
    (folder / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return f"mine={folder / 'q.jsonl'},{folder / 'img'},{folder / 'a.jsonl'}"


def test_every_method_runs_and_outputs_are_well_formed(model_dirs, bench_twig, tmp_path, capsys):
    out = tmp_path / "out"
    vlm = twigvlm.load(model_dirs["llama-clip"])
    spec = _file_task(tmp_path / "task", vlm)
    argv = ["bench", "--model", model_dirs["llama-clip"], "--twig", bench_twig, "--limit", "2", "--max-new-tokens",
            "4", "--keep-ratio", "0.5", "--out", str(out), "--tasks", f"easyvqa,scenes,describe;{spec}",
            "--methods", "hf,hf-early-exit,ar,fastv,visionzip,twig,ssd,twig+ssd"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | RelAcc |" in printed
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    ran = {"hf", "ar", "fastv", "visionzip", "twig", "ssd", "twig+ssd"}
    assert ran <= set(summary) and set(summary) | set(results["unsupported"]) == ran | {"hf-early-exit"}
    assert results["machine"]["torch"] and results["config"]["limit"] == 2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(summary) * (3 * 2 + 2)  # 3 built-in tasks × 2 + the file task's 2
    assert all(r["new_tokens"] <= 4 and r["tokens_per_s"] > 0 for r in rows)
    # The lossless pairs and our plain engine match their references token for token.
    assert summary["ar"]["same_as"] == "hf" and summary["ar"]["mismatches"] == 0
    assert summary["ssd"]["mismatches"] == 0 and summary["twig+ssd"]["mismatches"] == 0
    # On the file task hf scores 1.0 by construction, so ar's RelAcc is exactly 1.0.
    assert summary["hf"]["accuracy"]["mine"] == 1.0 and summary["ar"]["accuracy"]["mine"] == 1.0
    assert summary["ar"]["rel_acc"] == 1.0
    assert 0 < summary["ssd"]["acceptance"] <= 1 and summary["twig"]["kept"] > 0
    assert (out / "plot.png").stat().st_size > 1000 and (out / "table.md").is_file()


def test_ablations_expand_into_variants(model_dirs, bench_twig, tmp_path, capsys):
    argv = ["bench", "--model", model_dirs["llama-clip"], "--twig", bench_twig, "--limit", "1", "--max-new-tokens",
            "3", "--tasks", "scenes", "--out", str(tmp_path / "d"), "--ablation", "draft"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "d" / "results.json").read_text())["summary"]
    assert {"hf", "ar", "ssd γ=1 τ=0.0", "ssd γ=8 τ=0.6"} <= set(summary)
    assert all(summary[k]["mismatches"] == 0 for k in summary if k.startswith("ssd"))


def test_normalization_and_exact_match():
    assert normalize("The Red circle.") == "red circle"
    assert normalize("Two") == "2" and normalize("3.5") == "3.5"
    assert exact_match("Yes!", ["yes", "yeah"]) == 1.0 and exact_match("no", ["yes"]) == 0.0


@pytest.mark.parametrize("content,name,why", [
    ('{"question_id": 1, "text": "q", "image": "a.png"}\n{oops\n', "q", "line 2 is not JSON"),
    ('{"question_id": 1}\n', "q", "line 1: needs 'question_id' and 'text'"),
    ('{"question_id": 1, "text": "q", "image": "nope.png"}\n', "q", "line 1: image .*nope.png does not exist"),
    ('{"question_id": 1, "answers": [3]}\n', "a", "line 1: needs 'question_id' and 'answer'"),
])
def test_malformed_task_files_name_file_and_line(tmp_path, content, name, why):
    random_image(0).save(tmp_path / "a.png")
    files = {"q": '{"question_id": 1, "text": "q", "image": "a.png"}\n', "a": '{"question_id": 1, "answer": "x"}\n'}
    files[name] = content
    for k, text in files.items():
        (tmp_path / f"{k}.jsonl").write_text(text)
    with pytest.raises(TwigVLMError, match=f"{name}.jsonl {why}"):
        from_files("t", tmp_path / "q.jsonl", tmp_path, tmp_path / "a.jsonl")


def test_bench_errors_exit_2(model_dirs, tmp_path, capsys):
    base = ["bench", "--model", model_dirs["llama-clip"], "--out", str(tmp_path / "o")]
    for argv, why in [(base + ["--methods", "ar,warp"], "unknown method 'warp'"),
                      (base + ["--methods", "twig"], "need a twig"),
                      (base + ["--tasks", "nope", "--methods", "hf,ar"], "unknown task 'nope'"),
                      (base + ["--limit", "0"], "must be positive")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
