"""Models by hub id, offline: a cached "owner/name" loads like its directory; a missing one, or an argument that is
neither a directory nor a hub id, is one line (exit 2 from the CLI) that says what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import twigvlm
from twigvlm.errors import TwigVLMError
from twigvlm.inputs.hub import parse_hub_id, resolve_model_dir

from .conftest import random_image

MAIN, OTHER = "a" * 40, "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline (the environment, and huggingface_hub's reading of it)."""
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def put_in_cache(hub: Path, repo_id: str, model_dir: str, commit: str, ref: str | None = "main") -> Path:
    """Lay `model_dir` out as the hub cache does: models--owner--name/snapshots/<commit>/..., refs/<ref>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_a_cached_hub_id_loads_and_generates_like_its_directory(cache, model_dirs, vlms):
    snapshot = put_in_cache(cache, "owner/name", model_dirs["llama-clip"], MAIN)
    assert resolve_model_dir("owner/name") == snapshot
    by_id = twigvlm.load("owner/name")
    kwargs = {"image": random_image(3), "max_new_tokens": 6, "ignore_eos": True}
    assert (
        by_id.generate("what color?", **kwargs).token_ids
        == vlms["llama-clip"].generate("what color?", **kwargs).token_ids
    )


def test_revisions_resolve_to_their_snapshots(cache, model_dirs):
    main = put_in_cache(cache, "owner/name", model_dirs["llama-clip"], MAIN)
    tagged = put_in_cache(cache, "owner/name", model_dirs["qwen2-siglip"], OTHER, ref="v1")
    assert resolve_model_dir("owner/name@main") == main
    assert resolve_model_dir("owner/name@v1") == tagged
    assert resolve_model_dir(f"owner/name@{OTHER}") == tagged  # a commit hash needs no ref
    with pytest.raises(TwigVLMError, match="owner/name@v2 is neither a local directory nor in the Hugging Face cache"):
        resolve_model_dir("owner/name@v2")


def test_a_directory_wins_over_a_hub_id_of_the_same_name(cache, model_dirs, tmp_path, monkeypatch):
    (tmp_path / "owner").mkdir()
    shutil.copytree(model_dirs["llama-clip"], tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("owner/name") == Path("owner/name")


@pytest.mark.parametrize("model", ["owner/missing", Path("owner/missing"), "owner/name@v1"])
def test_an_uncached_hub_id_offline_is_one_line_naming_the_id_and_hf_hub_offline(cache, model):
    with pytest.raises(TwigVLMError) as exc:
        twigvlm.load(model)
    text = str(exc.value)
    assert "\n" not in text and exc.value.__cause__ is None
    assert text.startswith(f"model {model} is neither a local directory nor in the Hugging Face cache")
    repo, _, revision = str(model).partition("@")
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")  # the revision asked for
    assert "HF_HUB_OFFLINE is set" in text and f"`{command}` on a machine with network" in text


def test_an_unreachable_hub_is_one_line_naming_the_id(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    with pytest.raises(TwigVLMError) as exc:
        resolve_model_dir("owner/missing")
    text = str(exc.value)
    assert "\n" not in text and "owner/missing" in text and "the hub cannot be reached" in text, text
    assert "HF_HUB_OFFLINE=1" in text


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("no/such/folder", "does not exist"),
        ("/nowhere/at/all", "does not exist"),
        ("single", "does not exist"),
        ("owner/bad--name", "does not exist"),  # the hub forbids "--" in names
        ("owner/name@", "does not exist"),
        ("file.txt", "is a file"),
    ],
)
def test_neither_a_directory_nor_a_hub_id_is_one_line(cache, tmp_path, monkeypatch, model, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a model")
    assert parse_hub_id(model) is None
    with pytest.raises(TwigVLMError) as exc:
        twigvlm.load(model)
    assert str(exc.value) == (
        f"model {model} {problem}: it is neither a model directory (save_pretrained output) nor a Hugging Face "
        "hub id (owner/name)"
    )


def test_hub_ids_have_the_hubs_shape():
    assert parse_hub_id("Qwen/Qwen2.5-VL-7B-Instruct") == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert parse_hub_id("llava-hf/llava-1.5-7b-hf@refs/pr/3") == ("llava-hf/llava-1.5-7b-hf", "refs/pr/3")
    assert parse_hub_id("./owner/name") is None and parse_hub_id("owner/na me") is None


def test_the_cli_exits_2_with_one_line_for_a_missing_hub_id(tmp_path):
    # A fresh process reads HF_HUB_OFFLINE and the cache location from its environment, as a user's shell sets them.
    script = Path(sys.executable).with_name("twigvlm")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "twigvlm.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run(
        cmd + ["generate", "--model", "owner/missing", "--prompt", "hi"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert (
        "owner/missing" in run.stderr and "HF_HUB_OFFLINE" in run.stderr and "hf download owner/missing" in run.stderr
    )


def test_a_pixel_range_is_checked_before_the_model_loads(cache, model_dirs, monkeypatch, capsys):
    """--min-pixels on a family without an image size range, named by a directory or a cached hub id, and an empty
    range, are one line before the load (minutes for a large model); the demo (a name) is checked after it."""
    from twigvlm.cli.main import main

    monkeypatch.setattr(twigvlm.api, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    put_in_cache(cache, "owner/llava", model_dirs["llama-clip"], MAIN)
    for model, extra, why in [
        (model_dirs["llama-clip"], ["--min-pixels", "4096"], "needs an image size range"),
        ("owner/llava", ["--max-pixels", "4096"], "needs an image size range"),
        ("owner/qwen", ["--min-pixels", "4096", "--max-pixels", "1024"], "must not exceed max_pixels"),
    ]:
        assert main(["generate", "--model", model, "--prompt", "hi", *extra]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
