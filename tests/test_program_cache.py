"""The program cache (`runtime/program_cache.py`): a later process loads the decode-step programs an earlier one
compiled, compiles nothing, and gives the eager steps' greedy ids; a program's name changes with what its code
depends on (the call, the rows it was traced for, the layer's constants) but not with the layer's index or the
folder the model came from; a file that does not load is removed (the program is compiled again);
TWIGVLM_COMPILE_CACHE=off reads and writes nothing; the least recently used files beyond MAX_FILES go.

Elsewhere in the suite the cache is on in each test process's own cache folder, so a program a test needs that an
earlier test in the same process compiled is loaded, and that test's oracles hold it to the eager steps too."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import twigvlm
from twigvlm.runtime import compiled as compiled_steps
from twigvlm.runtime import program_cache

from .conftest import random_image, random_prompt

_LATER_PROCESS = r"""
import json, sys
from PIL import Image
import twigvlm
vlm = twigvlm.load(sys.argv[1], compile="on")
out = vlm.generate(sys.argv[2], image=Image.open(sys.argv[3]), max_new_tokens=10, ignore_eos=True)
s = vlm.engine.programs.stats
print(json.dumps({"ids": out.token_ids, "programs": s.programs, "loaded": s.loaded, "calls": s.calls}))
"""


def test_a_later_process_loads_the_programs_instead_of_compiling_them(model_dirs, tmp_path, monkeypatch):
    cache, built = tmp_path / "cache", Path(os.environ["TWIGVLM_CACHE"]) / "native"
    built.mkdir(parents=True, exist_ok=True)
    cache.mkdir()
    (cache / "native").symlink_to(built)  # the native kernel: built once per test process
    monkeypatch.setenv("TWIGVLM_CACHE", str(cache))
    image, prompt = tmp_path / "a.png", random_prompt(12, 5)
    random_image(12).save(image)
    vlm = twigvlm.load(model_dirs["llama-clip"], compile="off")
    args = dict(image=random_image(12), max_new_tokens=10, ignore_eos=True)
    eager = vlm.generate(prompt, **args).token_ids
    vlm.set_compile("on")
    assert vlm.generate(prompt, **args).token_ids == eager
    stats = vlm.engine.programs.stats
    assert (stats.programs, stats.loaded) == (1, 0)  # the one-token program, compiled here and saved
    assert len(list(program_cache.folder().glob("*.bin"))) == 1
    run = subprocess.run([sys.executable, "-c", _LATER_PROCESS, model_dirs["llama-clip"], prompt, str(image)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    later = json.loads(run.stdout.splitlines()[-1])
    assert later["ids"] == eager
    assert later["programs"] == later["loaded"] == 1 and later["calls"] > 0, run.stderr  # loaded, nothing compiled


def test_a_programs_name_follows_what_its_code_depends_on(adapters, model_dirs, tmp_path):
    layers = adapters["llama-clip"].layers
    moved = shutil.copytree(model_dirs["llama-clip"], tmp_path / "elsewhere")
    key, cpu = ("a kind of call", torch.float32), torch.device("cpu")
    name = program_cache.digest(key, layers[0], 1, cpu)
    assert program_cache.digest(key, layers[-1], 1, cpu) == name  # the layer's index is not traced in
    assert program_cache.digest(key, twigvlm.load(moved).adapter.layers[0], 1, cpu) == name  # nor the folder
    assert program_cache.digest(("another kind", torch.float32), layers[0], 1, cpu) != name
    assert program_cache.digest(key, layers[0], 4, cpu) != name  # products traced for 4 rows
    scaled = copy.deepcopy(layers[0])
    scaled.self_attn.scaling *= 2  # a constant tracing bakes in
    assert program_cache.digest(key, scaled, 1, cpu) != name
    other = copy.deepcopy(layers[0])
    other.self_attn.config.rope_theta = 1.0  # the layer's config
    assert program_cache.digest(key, other, 1, cpu) != name


def test_layers_whose_constants_differ_share_no_program_in_a_process(adapters):
    """The in-process key, like the file's name: layers that differ only in their index share one program; a layer
    with a constant of its own (a sliding window, a scale) gets its own."""
    layers = adapters["llama-clip"].layers
    programs = compiled_steps.StepPrograms(adapters["llama-clip"])
    assert programs._layer_key(layers[0]) == programs._layer_key(layers[-1])
    for attribute, value in (("sliding_window", 4), ("scaling", 2 * layers[0].self_attn.scaling)):
        changed = copy.deepcopy(layers[0])
        setattr(changed.self_attn, attribute, value)
        assert programs._layer_key(changed) != programs._layer_key(layers[0]), attribute


class _Program:
    """Stands in for a compiled program: saving writes its bytes."""

    def save_compiled_function(self, path: str, external_data: dict) -> None:
        Path(path).write_bytes(b"a program")


def test_bad_files_off_and_old_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    folder = program_cache.folder()
    folder.mkdir(parents=True)
    (folder / "bad.bin").write_bytes(b"not a program")
    assert program_cache.load("bad", None, {}) is None and not (folder / "bad.bin").exists()
    assert "did not load; compiling it again" in caplog.text
    monkeypatch.setenv(program_cache.ENV, "off")
    program_cache.save("p", _Program(), None)
    assert not (folder / "p.bin").exists()
    (folder / "p.bin").write_bytes(b"not a program")
    assert program_cache.load("p", None, {}) is None and (folder / "p.bin").exists()  # not even read
    monkeypatch.delenv(program_cache.ENV)
    monkeypatch.setattr(program_cache, "MAX_FILES", 2)
    for i, name in enumerate(("p", "q", "r")):
        program_cache.save(name, _Program(), None)
        os.utime(folder / f"{name}.bin", (i, i))
    assert sorted(p.name for p in folder.glob("*.bin")) == ["q.bin", "r.bin"]  # the least recently used went
