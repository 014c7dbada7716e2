"""The `twigvlm` CLI: happy paths, and every bad input → one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig

from twigvlm import PruneConfig
from twigvlm.cli.main import main
from twigvlm.pruning.prefill import default_wipe_layer, plan_pruning
from twigvlm.tiny.llava import TinySpec, save_tiny_llava
from twigvlm.version import __version__

from .conftest import random_image


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "img.png"
    random_image(0).save(path)
    return str(path)


@pytest.fixture(scope="module")
def twig_dir(tmp_path_factory, model_dirs) -> str:
    out = tmp_path_factory.mktemp("twig") / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--K", "2", "--T", "3", "--out", str(out)]) == 0
    return str(out)


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, model_dirs, image, twig_dir):
    code, out, err = _run(
        capsys,
        [
            "generate",
            "--model",
            model_dirs["llama-clip"],
            "--twig",
            twig_dir,
            "--image",
            image,
            "--prompt",
            "what is it?",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--json",
        ],
    )
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj) == {"text", "token_ids", "stats"} and len(obj["token_ids"]) == 5
    assert {"new_tokens", "prefill_s", "decode_s", "tokens_per_s"} <= set(obj["stats"])
    assert obj["stats"]["new_tokens"] == 5 and obj["stats"]["visual_tokens"] == 16
    s = obj["stats"]
    assert s["ttft_s"] == s["encode_s"] + s["prefill_s"] and s["encode_s"] > 0  # time to first token, tower included


def test_generate_streams_text(capsys, model_dirs, image):
    code, out, err = _run(
        capsys,
        [
            "generate",
            "--model",
            model_dirs["qwen2-siglip"],
            "--image",
            image,
            "--image",
            image,
            "--prompt",
            "compare",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        ],
    )
    assert code == 0 and out.endswith("\n") and "32 visual tokens" in err


def test_a_seed_gives_one_text_with_speculation_on_the_command_line(capsys, model_dirs, image, twig_dir):
    gen = ["generate", "--model", model_dirs["llama-clip"], "--twig", twig_dir, "--image", image, "--prompt", "hi",
           "--max-new-tokens", "8", "--ignore-eos", "--temperature", "1", "--seed", "5", "--json"]  # fmt: skip
    texts = []
    for extra in ([], ["--speculative"], ["--speculative", "--draft", "tree"], ["--sampling", "positional"]):
        code, out, err = _run(capsys, gen + extra)
        assert code == 0, err
        texts.append(json.loads(out)["token_ids"])
        stats = json.loads(out)["stats"]
        if "--speculative" in extra:  # it drafted (a tree where one was asked for; auto's choice otherwise)
            assert stats["drafted"] > 0 and stats["drafter"] in ({"tree"} if "tree" in extra else {"chain", "tree"})
    assert texts[1:] == texts[:1] * 3
    code, out, err = _run(capsys, gen + ["--sampling", "sequential"])
    assert code == 0 and len(json.loads(out)["token_ids"]) == 8, err


@pytest.mark.parametrize("method", ["twig", "fastv", "visionzip"])
def test_generate_with_pruning_reports_and_pictures_the_kept_tokens(
    capsys, model_dirs, image, twig_dir, tmp_path, method
):
    png = tmp_path / ("kept.webp" if method == "visionzip" else "kept.png")  # written as its suffix says
    code, out, err = _run(
        capsys,
        [
            "generate",
            "--model",
            model_dirs["llama-clip"],
            "--twig",
            twig_dir,
            "--image",
            image,
            "--prompt",
            "what is it?",
            "--max-new-tokens",
            "3",
            "--prune",
            method,
            "--keep",
            "8",
            "--json",
            "--save-kept",
            str(png),
        ],
    )
    assert code == 0, err
    stats = json.loads(out)["stats"]
    assert stats["visual_tokens"] == 16 and stats["prune_method"] == method
    assert len(stats["kept_indices"]) == stats["kept"] and 0 < stats["kept"] < 16
    L = AutoConfig.from_pretrained(model_dirs["llama-clip"]).text_config.num_hidden_layers
    if method != "visionzip":  # R̄ = 8 over the layers: every layer's kept count as the budget's formula says
        assert stats["avg_kept"] == pytest.approx(plan_pruning(PruneConfig(method, keep=8), L, 16, 2).avg_kept)
    else:  # every layer holds VisionZip's 8
        assert stats["avg_kept"] == stats["kept"] == 8
    assert stats["wipe_layer"] == (None if method == "visionzip" else default_wipe_layer(L))
    picture = Image.open(png)
    assert picture.format == png.suffix[1:].upper()
    side = picture.size[0]
    assert picture.size == (side, side) and side >= 336  # a 32-px model view, enlarged; 4×4 patches
    cell = side // 4
    dark = sum(
        1
        for r in range(4)
        for c in range(4)
        if sum(picture.getpixel((c * cell + cell // 2, r * cell + cell // 2))) < 200
    )
    assert 16 - stats["kept"] <= dark <= 16 - stats["kept"] + 2  # pruned patches are dimmed (a kept one rarely is)


def test_generate_speculative_json(capsys, model_dirs, image, twig_dir):
    base = [
        "generate",
        "--model",
        model_dirs["llama-clip"],
        "--twig",
        twig_dir,
        "--image",
        image,
        "--prompt",
        "describe",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]
    code, out, err = _run(capsys, base)
    ar = json.loads(out)
    code, out, err = _run(
        capsys,
        base
        + [
            "--speculative",
            "--draft-len",
            "3",
            "--draft-threshold",
            "0",
            "--adaptive-draft",
            "--prune",
            "twig",
            "--keep",
            "8",
        ],
    )
    assert code == 0, err
    sd = json.loads(out)
    stats = sd["stats"]
    assert {
        "drafted",
        "accepted",
        "acceptance_rate",
        "tokens_per_verification",
        "mean_accepted_per_step",
        "draft_s",
        "verify_s",
        "prefill_s",
    } <= set(stats) and stats["drafted"] > 0
    assert stats["mean_accepted_per_step"] == stats["tokens_per_verification"]
    assert len(sd["token_ids"]) == 12 and len(ar["token_ids"]) == 12
    code, out, err = _run(capsys, base + ["--prune", "twig", "--keep", "8"])
    assert code == 0, err
    assert sd["token_ids"] == json.loads(out)["token_ids"]  # TTP + SSD ≡ TTP


def test_grow_writes_a_twig(capsys, model_dirs, tmp_path):
    code, out, _ = _run(
        capsys,
        [
            "grow",
            "--model",
            model_dirs["qwen2-siglip"],
            "--K",
            "1",
            "--T",
            "2",
            "--out",
            str(tmp_path / "t"),
            "--wipe-layer",
            "3",
        ],
    )
    assert code == 0 and "head=shared" in out
    meta = json.loads((tmp_path / "t" / "twig.json").read_text())
    assert (meta["K"], meta["wipe_layer"]) == (1, 3)


def _bad_inputs(model_dirs, image, twig_dir, tmp: Path):
    (tmp / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp / "float.tiff")
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    other = save_tiny_llava(tmp / "other", TinySpec(backbone="qwen2", tower="siglip"))
    m = model_dirs["llama-clip"]
    gen = ["generate", "--model", m, "--prompt", "hi"]
    return {
        "missing image": (gen + ["--image", str(tmp / "missing.png")], "does not exist"),
        "unreadable image": (gen + ["--image", str(tmp / "notes.png")], "not a readable image"),
        "unsupported mode": (gen + ["--image", str(tmp / "float.tiff")], "mode 'F'"),
        "empty prompt": (["generate", "--model", m, "--image", image, "--prompt", " "], "prompt is empty"),
        "K < 1": (["grow", "--model", m, "--K", "0", "--out", str(tmp / "g1")], "--K: 0 is not positive"),
        "K+T > L": (["grow", "--model", m, "--K", "4", "--T", "3", "--out", str(tmp / "g2")], "exceeds"),
        "wipe before K": (
            ["grow", "--model", m, "--wipe-layer", "2", "--out", str(tmp / "g4")],
            "wipe_layer=2 is invalid: give a layer after K=2 (FinalWipe",  # L is not known before the load
        ),
        "wipe past L": (
            ["grow", "--model", m, "--wipe-layer", "99", "--out", str(tmp / "g5")],
            "wipe_layer=99 is invalid",
        ),
        "not a VLM": (["generate", "--model", str(tmp / "bert"), "--prompt", "hi"], "not a supported VLM"),
        "no model dir": (["grow", "--model", str(tmp / "nowhere"), "--out", str(tmp / "g3")], "does not exist"),
        "twig for another base": (
            ["generate", "--model", str(other), "--twig", twig_dir, "--prompt", "hi"],
            "another base model",
        ),
        "max-new-tokens 0": (gen + ["--max-new-tokens", "0"], "not positive"),
        "max-new-tokens -3": (gen + ["--max-new-tokens=-3"], "not positive"),
        "past the context": (gen + ["--max-new-tokens", "100000000"], "does not fit: the prompt"),
        "bad top-p": (gen + ["--top-p", "0", "--temperature", "1"], "top_p"),
        "seed while greedy": (gen + ["--seed", "3"], "--seed needs --temperature above 0"),
        "top-k while greedy": (gen + ["--top-k", "5", "--temperature", "0"], "--top-k needs --temperature above 0"),
        "sampling while greedy": (gen + ["--sampling", "positional"], "--sampling needs --temperature"),
        "pruning without a picture": (gen + ["--prune", "fastv"], "--prune fastv needs an --image or a --video"),
        "unknown flag": (gen + ["--bogus"], "unrecognized arguments"),
        "abbreviated flag": (gen + ["--max-new", "3"], "unrecognized arguments: --max-new 3"),
        "save-kept without pruning": (gen + ["--image", image, "--save-kept", str(tmp / "k.png")], "give --prune"),
        "image is a directory": (gen + ["--image", str(tmp)], "is a directory"),
        "huge seed": (gen + ["--seed", str(2**70), "--temperature", "1"], "seed"),
        "bad sampling": (gen + ["--sampling", "gumbel"], "invalid choice: 'gumbel'"),
        "no such device": (gen + ["--device", "banana"], "not a torch device"),
        "grow into a file": (["grow", "--model", m, "--out", str(tmp / "notes.png" / "twig")], "which is a file"),
        "tiny onto a file": (["tiny", "--out", str(tmp / "notes.png")], "notes.png is a file: give a folder path"),
        "demo onto a file": (["demo", "--out", str(tmp / "notes.png")], "notes.png is a file: give a folder path"),
        "bench onto a file": (["bench", "--model", m, "--methods", "hf", "--out", str(tmp / "notes.png")], "is a file"),
        "distill-data onto a folder": (
            ["distill-data", "--model", m, "--data", str(tmp / "notes.png"), "--out", str(tmp / "bert")],
            "bert is a folder: give a file path",
        ),
        "twig pruning without a twig": (gen + ["--image", image, "--prune", "twig"], "needs a twig"),
        "speculative without a twig": (gen + ["--speculative"], "drafts with a twig"),
        "draft-len 0": (gen + ["--speculative", "--draft-len", "0"], "not positive"),
        "draft-threshold 1": (gen + ["--speculative", "--draft-threshold", "1"], "threshold"),
        "infeasible budget": (gen + ["--image", image, "--prune", "fastv", "--keep", "1"], "infeasible"),
        "keep and keep-ratio": (gen + ["--keep", "3", "--keep-ratio", "0.1"], "not allowed with"),
        "unknown prune method": (gen + ["--prune", "random"], "invalid choice"),
        "save-kept in no format": (gen + ["--image", image, "--save-kept", str(tmp / "k.jpgx")], "no .jpgx pictures"),
        "save-kept into nowhere": (
            gen + ["--image", image, "--save-kept", str(tmp / "no" / "k.png")],
            "does not exist",
        ),
    }


def test_bad_inputs_exit_2_with_one_line(capsys, model_dirs, image, twig_dir, tmp_path):
    cases = _bad_inputs(model_dirs, image, twig_dir, tmp_path)
    capsys.readouterr()
    for name, (argv, message) in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as exc:  # argparse errors exit; ours return 2
            raise SystemExit(main(argv))
        out, err = capsys.readouterr()
        assert exc.value.code == 2, name
        assert out == "", name
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, (name, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"{name} wrote files"


def test_console_script_end_to_end(model_dirs, image, tmp_path):
    # The real entry point, in a fresh process: a bad input gives exit 2 and one line; a good one prints text.
    script = Path(sys.executable).with_name("twigvlm")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "twigvlm.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(
        cmd + ["generate", "--model", model_dirs["llama-clip"], "--image", str(tmp_path / "x.png"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    good = subprocess.run(
        cmd
        + [
            "generate",
            "--model",
            model_dirs["llama-clip"],
            "--image",
            image,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["stats"]["new_tokens"] <= 3


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_grow_never_overwrites_a_twig_without_force(capsys, model_dirs, tmp_path):
    m, out = model_dirs["llama-clip"], tmp_path / "twig"
    assert main(["grow", "--model", m, "--K", "2", "--T", "3", "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["grow", "--model", m, "--K", "1", "--T", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a twig" in err and "--force" in err and "Traceback" not in err
    assert _snapshot(out) == before, "the existing twig changed"
    # Half a twig counts too: a folder with only the weights is refused as well.
    (out / "twig.json").unlink()
    assert main(["grow", "--model", m, "--K", "1", "--T", "1", "--out", str(out)]) == 2
    capsys.readouterr()
    assert main(["grow", "--model", m, "--K", "1", "--T", "1", "--out", str(out), "--force"]) == 0
    meta = json.loads((out / "twig.json").read_text())
    assert (meta["K"], meta["T"]) == (1, 1)


def test_one_time_work_says_what_it_is_doing(capsys, model_dirs, image, tmp_path, monkeypatch):
    """On a machine whose cache holds no kernel plan, a command says on stderr that it is measuring the CPU's
    products (and how long that took) before the answer; once the plan is cached it says nothing of it."""
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "--model", model_dirs["llama-clip"], "--image", image, "--prompt", "hi", "--max-new-tokens",
            "2", "--kernels", "products"]  # fmt: skip
    first, again = _run(capsys, argv), _run(capsys, argv)
    assert first[0] == again[0] == 0 and first[1] == again[1]
    notice = [line for line in first[2].splitlines() if "products for" in line or line.startswith("... measured")]
    assert len(notice) == 2 and notice[0].startswith("measuring this CPU's fastest products for")
    assert str(tmp_path / "cache") in notice[0] and notice[1].endswith(" s")
    assert "measuring" not in again[2] and "measured" not in again[2]


def test_version_and_python_m_twigvlm(capsys):
    from importlib.metadata import version

    import twigvlm

    assert main(["--version"]) == 0  # main returns argparse's exit code, as it does ours
    assert capsys.readouterr().out.strip() == f"twigvlm {twigvlm.__version__}" == f"twigvlm {version('twigvlm')}"
    # `python -m twigvlm` is the console script: same version line, same one-line errors with exit code 2.
    run = subprocess.run([sys.executable, "-m", "twigvlm", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"twigvlm {twigvlm.__version__}"
    bad = subprocess.run([sys.executable, "-m", "twigvlm", "grow", "--K", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("twigvlm grow: error:")


# Run in a fresh interpreter: every call of the console script below must answer without importing these.
_HEAVY = ("torch", "transformers", "PIL")
_READS_FLAGS_ONLY = r"""
import contextlib, io, json, logging, sys
from twigvlm.cli.main import build_parser, main

commands = sorted(build_parser()._subparsers._group_actions[0].choices)
calls = [["--version"], ["--help"], *[[c, "--help"] for c in commands],
         ["tiny", "--out", "x", "--family", "nope"], ["bench", "--model", "m", "--limit", "0"],
         ["serve", "--model", "m", "--port", "-1"], ["generate", "--model", "m", "--prompt", " "],
         ["generate", "--model", "m", "--prompt", "hi", "--fps", "2"], ["chat", "--model", "m", "--speculative"],
         ["train", "--model", "m", "--data", "no-such.json", "--out", "o"]]
answers = []
for argv in calls:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    answers.append([argv, rc, out.getvalue(), err.getvalue()])
imported = [m for m in HEAVY if m in sys.modules]
import twigvlm  # its submodules are still attributes, imported when first read
submodules = twigvlm.api.VLM is twigvlm.VLM and twigvlm.runtime.kernels.__name__ == "twigvlm.runtime.kernels"
import transformers  # after the commands: the quiet logging they asked for holds once it is imported
log = transformers.utils.logging
quiet = log.get_verbosity() == logging.ERROR and not log.is_progress_bar_enabled()  # stderr is no terminal here
print(json.dumps({"commands": commands, "answers": answers, "imported": imported, "quiet": quiet, "sub": submodules}))
"""


def test_the_console_script_reads_its_flags_without_torch():
    """--version, --help, every command's --help, argparse's errors and the checks a command makes before it
    loads a model answer without importing torch, transformers or PIL (seconds on a small CPU), and the quiet
    logging the script sets still reaches transformers once a command imports it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    code = f"HEAVY = {_HEAVY!r}\n" + _READS_FLAGS_ONLY
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    report = json.loads(run.stdout)
    assert report["imported"] == []
    assert report["quiet"] and report["sub"]
    assert set(report["commands"]) == {
        "bench", "chat", "demo", "distill-data", "generate", "grow", "serve", "tiny", "train",
    }  # fmt: skip
    answers = {" ".join(argv): (rc, out, err) for argv, rc, out, err in report["answers"]}
    assert answers["--version"][:2] == (0, f"twigvlm {__version__}\n")
    assert all(name in answers["--help"][1] for name in report["commands"])
    for command in report["commands"]:
        rc, out, _ = answers[f"{command} --help"]
        assert rc == 0 and out.startswith(f"usage: twigvlm {command}")
    errors = {argv: err for argv, (rc, _, err) in answers.items() if "--help" not in argv and argv != "--version"}
    assert all(answers[argv][0] == 2 and err.count("\n") == 1 for argv, err in errors.items())
    assert "invalid choice: 'nope'" in errors["tiny --out x --family nope"]
    assert "--limit: 0 is not positive" in errors["bench --model m --limit 0"]
    assert "--prompt is empty" in errors["generate --model m --prompt  "]
    assert "--fps and --max-frames sample a --video" in errors["generate --model m --prompt hi --fps 2"]
    assert "drafts with a twig" in errors["chat --model m --speculative"]
    assert "data file no-such.json does not exist" in errors["train --model m --data no-such.json --out o"]


def test_the_package_exports_load_on_first_use():
    """`import twigvlm` is light; each public name is the defining module's object, and unknown names fail as
    attribute errors do."""
    import twigvlm
    import twigvlm.tiny
    from twigvlm import api, config, errors, tiny
    from twigvlm.generation import stats
    from twigvlm.tiny import llava

    defined = {"VLM": api, "load": api, "GenConfig": config, "PruneConfig": config, "SpecConfig": config}
    defined |= {"TwigConfig": config, "TwigVLMError": errors, "GenerationResult": stats, "GenerationStats": stats}
    assert set(twigvlm.__all__) == {*defined, "__version__"} and set(twigvlm.__all__) <= set(dir(twigvlm))
    for name, module in defined.items():
        assert getattr(twigvlm, name) is getattr(module, name)
    assert all(getattr(tiny, name) is getattr(llava, name) for name in tiny.__all__)
    for package in (twigvlm, tiny):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018
