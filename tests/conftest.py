"""Fixtures: tiny random LLaVA models built offline from configs, saved, and loaded back through the API."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

# The suite's oracles compare against stock nn.Linear products bit for bit: every model (and every CLI subprocess)
# loads with --kernels stock unless a test asks for the fast kernels (tests/test_kernels.py); a probed kernel plan
# is cached in a folder of the run's own.
os.environ["TWIGVLM_KERNELS"] = "stock"
os.environ["TWIGVLM_CACHE"] = tempfile.mkdtemp(prefix="twigvlm-cache-")

import twigvlm
from twigvlm.tiny.llava import TinySpec, save_tiny_llava

# Llama backbone with grouped-query attention (4 heads, 2 KV heads) + CLIP tower ("default": CLS dropped),
# untied head; Qwen2 backbone + SigLIP tower ("full"), tied embeddings.
SPECS = {
    "llama-clip": TinySpec(backbone="llama", tower="clip", tie_embeddings=False),
    "qwen2-siglip": TinySpec(backbone="qwen2", tower="siglip", tie_embeddings=True, seed=1),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: str(save_tiny_llava(root / name, spec)) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def vlms(model_dirs) -> dict[str, twigvlm.VLM]:
    return {name: twigvlm.load(path) for name, path in model_dirs.items()}


@pytest.fixture(params=sorted(SPECS))
def vlm(request, vlms) -> twigvlm.VLM:
    v = vlms[request.param]
    v.twig = None
    return v


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8))


def random_prompt(seed: int, words: int) -> str:
    vocab = "what color shape left right red blue green circle square how many is the a of on".split()
    rng = np.random.RandomState(seed)
    return " ".join(rng.choice(vocab, size=words)) + "?"


def hf_greedy(vlm: twigvlm.VLM, prompt: str, images: list, max_new_tokens: int) -> list[int]:
    """Stock `model.generate(do_sample=False)` on the same processed inputs; EOS disabled."""
    adapter = vlm.adapter
    batch = adapter.processor(images=images or None, text=adapter.render(prompt, len(images)), return_tensors="pt")
    with torch.inference_mode():
        out = adapter.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return out[0, batch["input_ids"].shape[1] :].tolist()


COLORS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60)}


def write_llava_data(folder, n: int, seed: int = 0, name: str = "data.json") -> str:
    """A small LLaVA-format set: solid-colour images, "what color" questions (every third record has a second
    turn), and one text-only record at the end. Returns the data file's path; images are relative to it."""
    import json
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
