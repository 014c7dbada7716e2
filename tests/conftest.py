"""Fixtures: tiny random models of every family the suite runs, built offline from configs, saved, and loaded
back through the API; random inputs (prompts, images, clips, an mp4 file) and LLaVA-format data.

Session models are shared as *adapters* only: each test gets a fresh `VLM` around them (`vlm`, `vlms`, `zoo(name)`),
so a twig one test grows or attaches can never be seen by another. Tests that need a twig build their own
(`oracles.with_twig`) or pass one per generation (`twig=`)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
from packaging.version import Version
from PIL import Image

# The suite's oracles compare against stock nn.Linear products bit for bit: every model (and every CLI subprocess)
# loads with --kernels stock unless a test asks for the fast kernels (tests/test_kernels.py); a probed kernel plan
# is cached in a folder of the run's own.
os.environ["TWIGVLM_KERNELS"] = "stock"
# Compiled decode steps only where a test turns them on (tests/test_compiled.py): auto's one-off probe would
# otherwise compile and time every tiny model the suite loads.
os.environ["TWIGVLM_COMPILE"] = "off"
os.environ["TWIGVLM_CACHE"] = tempfile.mkdtemp(prefix="twigvlm-cache-")
os.environ.pop("TWIGVLM_REMEASURE", None)  # the suite's caching tests read what they wrote
# The native layers' team stays at the threads a test sets (the thread governor's own tests build governors of
# their own): under `-n 2` the suite's workers preempt each other, and a test meant to run two threads would not.
os.environ["TWIGVLM_ADAPTIVE_THREADS"] = "0"
# Likewise auto's draft gate (tests/test_gate.py turns it on): a timed pause in drafting would make the statistics
# the tests read (drafted, undrafted, verifications) depend on the machine's load; the ids never do.
os.environ["TWIGVLM_DRAFT_GATE"] = "0"

import twigvlm
from twigvlm.runtime import machine, native
from twigvlm.tiny.families import TinyFamilySpec
from twigvlm.tiny.llava import TinySpec, save_tiny_llava
from twigvlm.tiny.qwen import TinyQwenSpec

# The host's steal (a shared VM's neighbours) is not the suite's to see: a measurement the suite caches is read back
# by its caching tests, never measured again because the host was busy (test_kernels patches its own /proc/stat).
machine.PROC_STAT = os.path.join(os.environ["TWIGVLM_CACHE"], "no-proc-stat")

# Llama backbone with grouped-query attention (4 heads, 2 KV heads) + CLIP tower ("default": CLS dropped),
# untied head; Qwen2 backbone + SigLIP tower ("full"), tied embeddings.
SPECS = {
    "llama-clip": TinySpec(backbone="llama", tower="clip", tie_embeddings=False),
    "qwen2-siglip": TinySpec(backbone="qwen2", tower="siglip", tie_embeddings=True, seed=1),
}


@dataclass(frozen=True)
class Family:
    """A family the conformance suite runs: its tiny model, whether it takes videos and whether VisionZip applies
    (facts the suite's parameters need before any model is built; `test_conformance.py` checks them)."""

    spec: Any  # TinySpec | TinyQwenSpec | TinyFamilySpec
    video: bool = False
    visionzip: bool = False

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers


FAMILIES = {
    "llama-clip": Family(SPECS["llama-clip"], visionzip=True),
    "qwen2-siglip": Family(SPECS["qwen2-siglip"], visionzip=True),
    "qwen2-vl": Family(TinyQwenSpec(family="qwen2-vl", num_layers=8, seed=10), video=True),
    "qwen2.5-vl": Family(TinyQwenSpec(family="qwen2.5-vl", num_layers=8, seed=11), video=True),
    "qwen3-vl": Family(TinyQwenSpec(family="qwen3-vl", num_layers=8, seed=12), video=True),
    "video-llava": Family(TinyFamilySpec(family="video-llava", num_layers=6, seed=20), video=True, visionzip=True),
    "llava-next": Family(TinyFamilySpec(family="llava-next", num_layers=6, seed=23)),
    "llava-next-video": Family(TinyFamilySpec(family="llava-next-video", num_layers=6, seed=26), video=True),
    "llava-onevision": Family(TinyFamilySpec(family="llava-onevision", num_layers=6, seed=22), video=True),
    "idefics3": Family(TinyFamilySpec(family="idefics3", num_layers=6, seed=25)),
    # A SmolVLM model behind an Idefics3 processor, built in memory (SmolVLM's own processor needs num2words).
    "smolvlm": Family(TinyFamilySpec(family="smolvlm", num_layers=6, seed=25)),
}
QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")

# Tests compiling steps on the session's shared adapters run in one test process (`make test`'s `--dist
# loadgroup`): an adapter's programs are shared by every VLM on it, so they are compiled once, not once per process.
SHARED_PROGRAMS = pytest.mark.xdist_group("compiled-programs")


def pytest_configure(config: pytest.Config) -> None:
    """`--dist loadgroup` needs a pytest that keeps the group pytest-xdist 3.8 appends to each node id, all its
    scheduler reads: pytest 9.2 drops it (pytest-xdist#1386) and the groups split without a word, every shared
    fixture loading in both processes. Stop instead."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    pytest_v, xdist_v = Version(pytest.__version__), Version(version("pytest-xdist"))
    if pytest_v >= Version("9.2.0.dev0") and xdist_v <= Version("3.8.0"):
        raise pytest.UsageError(
            f"pytest {pytest_v} with pytest-xdist {xdist_v} does not group tests under --dist loadgroup: "
            "install the versions constraints.txt names (make install)"
        )


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: str(save_tiny_llava(root / name, spec)) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def adapters(model_dirs) -> dict:
    """The LLaVA test models, loaded once: their adapters (wrap one in `twigvlm.VLM` to use it)."""
    return {name: twigvlm.load(path).adapter for name, path in model_dirs.items()}


@pytest.fixture
def vlms(adapters) -> dict[str, twigvlm.VLM]:
    """A fresh VLM (no twig) around each shared LLaVA adapter."""
    return {name: twigvlm.VLM(adapter) for name, adapter in adapters.items()}


@pytest.fixture(params=sorted(SPECS))
def vlm(request, adapters) -> twigvlm.VLM:
    return twigvlm.VLM(adapters[request.param])


class Zoo:
    """Every family's tiny model, built (saved and loaded back) on first use, once per test process;
    `zoo(name)` wraps the shared adapter in a fresh VLM without a twig."""

    def __init__(self, root, llava: dict) -> None:
        self.root, self._adapters = root, dict(llava)

    def adapter(self, name: str):
        if name not in self._adapters:
            from twigvlm.adapters import adapter_for
            from twigvlm.tiny.families import build_tiny_family, save_tiny_family
            from twigvlm.tiny.qwen import save_tiny_qwen

            spec = FAMILIES[name].spec
            if name == "smolvlm":
                self._adapters[name] = adapter_for(*build_tiny_family(spec))
            else:
                save = save_tiny_qwen if isinstance(spec, TinyQwenSpec) else save_tiny_family
                self._adapters[name] = twigvlm.load(save(self.root / name, spec)).adapter
        return self._adapters[name]

    def __call__(self, name: str) -> twigvlm.VLM:
        return twigvlm.VLM(self.adapter(name))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, adapters) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"), adapters)


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """Random pixels at (height, width)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8))


def random_prompt(seed: int, words: int) -> str:
    vocab = "what color shape left right red blue green circle square how many is the a of on".split()
    rng = np.random.RandomState(seed)
    return " ".join(rng.choice(vocab, size=words)) + "?"


def random_clip(seed: int, n: int = 3):
    """A `Video` of n random 48×64 frames at 2 frames per second (an odd n: the last frame pads Qwen-VL's final
    temporal patch)."""
    from twigvlm.inputs.video import load_video

    return load_video([random_image(seed * 10 + i, (48, 64)) for i in range(n)], fps=2.0)


def write_mp4(path, n: int = 8) -> None:
    """An mpeg4 file of n random 64×48 frames at 4 frames per second."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.asarray(random_image(i, (48, 64))), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


COLORS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60)}


def write_llava_data(folder, n: int, seed: int = 0, name: str = "data.json") -> str:
    """A small LLaVA-format set: solid-colour images, "what color" questions (every third record has a second
    turn), and one text-only record at the end. Returns the data file's path; images are relative to it."""
    import random
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        image = f"images/{seed}-{i}.png"
        Image.new("RGB", (40, 40), COLORS[color]).save(folder / image)
        conv = [
            {"from": "human", "value": "<image>\nWhat color is the picture?"},
            {"from": "gpt", "value": f"The picture is {color}."},
        ]
        if i % 3 == 0:
            conv += [
                {"from": "human", "value": "Is it red?"},
                {"from": "gpt", "value": "yes" if color == "red" else "no"},
            ]
        records.append({"id": f"{seed}-{i}", "image": image, "conversations": conv})
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]}
    )
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture(scope="session")
def llava_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llava-data")
    return {"train": write_llava_data(root / "train", 24, seed=0), "eval": write_llava_data(root / "eval", 6, seed=1)}


def write_video_data(folder, n: int = 3) -> str:
    """LLaVA-format records with "video" entries (folders of three frames), one with an image too, one text-only."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        clip_dir = folder / f"clip{i}"
        clip_dir.mkdir()
        for f in range(3):
            random_image(10 * i + f, (48, 64)).save(clip_dir / f"frame{f}.png")
        conv = [{"from": "human", "value": "What moves?"}, {"from": "gpt", "value": f"The shape moves {i}."}]
        records.append({"id": str(i), "video": f"clip{i}", "conversations": conv})
    random_image(7, (48, 64)).save(folder / "a.png")
    records[0]["image"] = "a.png"
    records[0]["conversations"][0]["value"] = "<image>\nand <video>\nWhat moves?"
    records.append({"id": "t", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "hi"}]})
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def native_spy(monkeypatch, name: str) -> list[int]:
    """The row counts of the products `twigvlm.runtime.native.<name>` computes from here on (so a test cannot pass
    on a fallback); skips where no C compiler can build the kernel, fails where one is there and the build did."""
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native kernel cannot be built (apt-get install gcc)")
    assert native.gemv_library() is not None, f"the native kernel did not build: {native.build_error()}"
    calls: list[int] = []
    real = getattr(native, name)

    def spy(x, *args):
        calls.append(x.numel() // x.shape[-1])  # rows
        return real(x, *args)

    monkeypatch.setattr(native, name, spy)
    return calls


def pruning_model(name: str, num_layers: int, seed: int) -> twigvlm.VLM:
    """A tiny LLaVA ("llama-clip" or "qwen2-siglip") with 64 visual tokens per image and `num_layers` layers, built
    in memory: room for several K, K_f and R' in the pruning oracles."""
    from twigvlm.tiny.llava import build_tiny_llava

    spec = {
        "llama-clip": TinySpec(num_layers=num_layers, image_size=64, tie_embeddings=False, seed=seed),
        "qwen2-siglip": TinySpec(backbone="qwen2", tower="siglip", num_layers=num_layers, image_size=64, seed=seed),
    }[name]
    model, processor = build_tiny_llava(spec)
    return twigvlm.VLM.from_model(model, processor)
