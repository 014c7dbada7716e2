"""The edge peer: llama.cpp (through `llama-cpp-python`, the `peers` extra) decoding with the same decoder.

On a CPU, what a user would run instead of PyTorch is llama.cpp. It has no vision tower for our models, so the
peer is measured where the comparison is fair — decoding: it reads a prompt of the same length as the sample's
(the prompt's text tokens, the visual positions filled with the tokenizer's padding token) and then decodes
greedily for the sample's `max_new_tokens` tokens with end-of-sequence ignored. Its answer is not scored (it never
saw the picture); its prefill and decode times are what the bench reports beside our methods.

The decoder's GGUF comes from the named model (`NamedModel.decoder_gguf`: the demo ships its decoder as a 4-bit
Q4_1 GGUF) or from `--gguf FILE`. `gguf_variant` writes the f32 and Q8_0 files from it once (every tensor
dequantised by the `gguf` package, then kept as f32 or quantised to Q8_0, norms in f32; metadata and tokenizer
copied), cached beside twigvlm's other builds. The weight values are the GGUF's (the demo's decoder without the
LoRA merged into our checkpoint): a product's speed does not depend on them.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TwigVLMError
from ..runtime.machine import cache_dir
from .variants import LLAMACPP_KINDS as KINDS

INSTALL_HINT = 'pip install "twigvlm[peers]" (builds llama.cpp from source: a few minutes)'


def available() -> str | None:
    """None when llama-cpp-python is installed, else the one-line reason it is not."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed: pip install gguf"
    return None


def gguf_variant(source: Path, kind: str) -> Path:
    """`source` (a GGUF file) with its weights as `kind` ("f32", "q8_0"; "q4_1": the source itself, which must be
    that), written once into the cache (keyed by the source's name and size)."""
    if kind not in KINDS:
        raise TwigVLMError(f"llama.cpp kind {kind!r} is unknown: use one of {', '.join(KINDS)}")
    if kind == "q4_1":
        return source
    target = cache_dir() / "gguf" / f"{source.stem}-{source.stat().st_size}.{kind}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        _convert(source, tmp, kind)
        tmp.replace(target)  # whole files only: an interrupted conversion leaves no half file behind
    return target


def _convert(source: Path, target: Path, kind: str) -> None:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(target), arch)
    file_type = {"f32": 0, "q8_0": 7}[kind]  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_Q8_0
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    q8 = GGMLQuantizationType.Q8_0
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)  # [rows, cols] as GGUF stores it
        if kind == "q8_0" and data.ndim == 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(t.name, quantize(data, q8), raw_dtype=q8)  # shape: from the bytes
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class PeerRun:
    """One llama.cpp run: the decoded ids and the prefill and decode seconds."""

    token_ids: list[int]
    prefill_s: float
    decode_s: float


class LlamaCpp:
    """One GGUF file loaded in llama.cpp, on torch's thread count, with a context for the longest run."""

    def __init__(self, path: Path, n_ctx: int = 2048) -> None:
        why = available()
        if why is not None:
            raise TwigVLMError(why)
        from llama_cpp import Llama

        threads = torch.get_num_threads()
        self.path = path
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def close(self) -> None:
        self.llm.close()

    def run(self, prompt_ids: list[int], new_tokens: int) -> PeerRun:
        """Prefill `prompt_ids`, then `new_tokens` greedy one-token steps (end-of-sequence ignored)."""
        if len(prompt_ids) + new_tokens > self.llm.n_ctx():
            raise TwigVLMError(f"llama.cpp's context of {self.llm.n_ctx()} tokens is too short for this sample")
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        t1 = time.perf_counter()
        ids = [int(np.argmax(_last_logits(llm)))]
        for _ in range(new_tokens - 1):
            llm.eval([ids[-1]])
            ids.append(int(np.argmax(_last_logits(llm))))
        return PeerRun(ids, t1 - t0, time.perf_counter() - t1)


def _last_logits(llm: Any) -> np.ndarray:
    """[V] the logits after the last evaluated token (llama.cpp keeps only those without logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
