"""The lmms-eval model class, offline: a local task definition over local JSON data (no hub), run through
`simple_evaluate` and through lmms-eval's command line (the model found by its `lmms_eval.models` entry point),
on a tiny model with a twig, pruning and speculation; its answers equal `twigvlm generate`'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from twigvlm.cli.main import main
from twigvlm.errors import TwigVLMError

from .conftest import COLORS

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make test installs it: the eval extra)")
try:
    import filelock._api  # noqa: F401 — simple_evaluate patches it
except ImportError:  # pragma: no cover
    pytest.skip("lmms-eval 0.7.3 needs filelock<4 (filelock._api); constraints.txt pins it", allow_module_level=True)

MAX_NEW_TOKENS = 4
TASK = f"""task: twig_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
  cache_dir: {{cache}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"])}
"""


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    """A tiny model, a grown twig, three pictures and the local task folder."""
    root = tmp_path_factory.mktemp("lmms")
    twig = root / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--out", str(twig)]) == 0
    docs = []
    for i, (color, rgb) in enumerate(sorted(COLORS.items())):
        Image.new("RGB", (40, 40), rgb).save(root / f"{i}.png")
        docs.append({"question": f"What color is picture {i}?", "image": str(root / f"{i}.png"), "answer": color})
    (root / "data.json").write_text(json.dumps(docs))
    (root / "tasks").mkdir()
    (root / "tasks" / "twig_local.yaml").write_text(TASK.format(data=root / "data.json", cache=root / "cache"))
    (root / "tasks" / "utils.py").write_text(UTILS)
    args = f"pretrained={model_dirs['llama-clip']},twig={twig},prune=twig,keep_ratio=0.5,speculative=True"
    args += ",draft=chain,draft_len=3"  # auto's choice depends on timings: pin the drafter to compare stats
    return {"root": root, "twig": str(twig), "model": model_dirs["llama-clip"], "docs": docs, "args": args}


def _generate(setup, doc, capsys) -> dict:
    argv = ["generate", "--model", setup["model"], "--twig", setup["twig"], "--image", doc["image"]]
    argv += ["--prompt", doc["question"], "--prune", "twig", "--keep-ratio", "0.5", "--speculative"]
    argv += ["--draft", "chain", "--draft-len", "3", "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _answer(logged: dict) -> str:
    """The model's answer in a logged sample: `resps` (in memory) or `filtered_resps` (the samples file)."""
    value = logged["resps"] if "resps" in logged else logged["filtered_resps"]
    while isinstance(value, list):
        value = value[0]
    return value


@pytest.fixture
def offline(monkeypatch, setup):
    """No hub: the offline switches, also in modules that read them at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(setup["root"] / "hf"))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_simple_evaluate_answers_as_twigvlm_generate(setup, offline, capsys):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from twigvlm.bench.lmms import TwigVLMEval

    model = TwigVLMEval.create_from_arg_string(setup["args"], {"batch_size": 1, "device": "cpu"})
    manager = TaskManager("WARNING", include_path=str(setup["root"] / "tasks"), include_defaults=False)
    results = simple_evaluate(model=model, tasks=["twig_local"], task_manager=manager, log_samples=True)
    logged = sorted(results["samples"]["twig_local"], key=lambda s: s["doc_id"])
    answers = [_answer(s) for s in logged]
    expected = [_generate(setup, doc, capsys) for doc in setup["docs"]]
    assert answers == [e["text"] for e in expected]
    assert "exact,none" in results["results"]["twig_local"]
    # the twig's statistics, per sample: pruned to the twig's budget, drafts verified
    stats = sorted(model.sample_stats, key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in stats] == [0, 1, 2]
    for got, want in zip(stats, expected, strict=True):
        assert got["prune_method"] == "twig" and got["kept"] == want["stats"]["kept"] < got["visual_tokens"]
        assert got["drafted"] == want["stats"]["drafted"] and got["new_tokens"] == len(want["token_ids"])


def test_other_request_types_are_refused_in_one_line(setup):
    from twigvlm.bench.lmms import TwigVLMEval

    model = TwigVLMEval(pretrained=setup["model"])
    for call in (model.loglikelihood, model.generate_until_multi_round):
        with pytest.raises(TwigVLMError, match="twigvlm answers generation tasks only"):
            call([])
    with pytest.raises(TwigVLMError, match="batch_size=4"):
        TwigVLMEval(pretrained=setup["model"], batch_size=4)


def _entry_point() -> str:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    return f"twigvlm = {declared['twigvlm']}"


def test_the_entry_point_lets_lmms_eval_find_the_model(tmp_path, monkeypatch):
    """lmms-eval's registry, reading the entry point pyproject.toml declares (installed here as a bare dist-info)."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from twigvlm.bench.lmms import TwigVLMEval

    info = tmp_path / "twigvlm_entry-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twigvlm-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{_entry_point()}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("twigvlm") is TwigVLMEval


@pytest.mark.slow
def test_lmms_eval_command_line(setup, tmp_path, capsys):
    """`python -m lmms_eval --model twigvlm ...` in a fresh process (it indexes lmms-eval's own tasks: ~15 s)."""
    info = tmp_path / "ep" / "twigvlm_entry-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twigvlm-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{_entry_point()}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "ep"), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lmms_eval", "--model", "twigvlm", "--model_args", setup["args"]]
    argv += ["--tasks", "twig_local", "--include_path", str(setup["root"] / "tasks")]
    argv += ["--output_path", str(out), "--log_samples", "--limit", "2"]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    logged = [json.loads(line) for f in out.rglob("*samples_twig_local.jsonl") for line in f.read_text().splitlines()]
    answers = {s["doc_id"]: _answer(s) for s in logged}
    assert answers == {i: _generate(setup, setup["docs"][i], capsys)["text"] for i in (0, 1)}
    assert "twigvlm twig_local doc 1:" in run.stdout + run.stderr  # the per-sample statistics line
