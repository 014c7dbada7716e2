"""A Llama GGUF file (the demo decoder's) read straight into a Hugging Face `LlamaForCausalLM`, in seconds.

transformers' own GGUF loading of the demo decoder takes about 45 s on a 2-core CPU, and nearly all of it is
parsing the file's metadata (the 49k-entry vocabulary and merge table, element by element, more than once), not
the weights. This module reads the file once:

- the header, metadata and tensor table with `struct` over a memory map (the GGUF layout, versions 2 and 3:
  magic, version, tensor and key counts, typed key/value pairs, then per tensor its name, dimensions fastest
  first, ggml type and offset into the data section, which starts at the next `general.alignment` boundary);
- the tensors dequantised in torch with the `gguf` package's arithmetic (F32, F16, BF16, Q8_0, Q4_0, Q4_1: the
  block formats a Llama file of this size comes in; the type ids and block sizes are the package's), renamed
  from llama.cpp's names to LlamaForCausalLM's, with the row order llama.cpp gives the query and key projections
  (its rotary layout) put back;
- the `LlamaConfig` from the metadata, key for key as transformers maps it.

`read_llama` raises `Unsupported` for anything else (another architecture, a block format or a tensor it does
not know), and the caller falls back to transformers' loader. The tokenizer is not read here: transformers builds
it from the file in about a second (`PreTrainedTokenizerFast.from_pretrained(..., gguf_file=...)`).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V


class Unsupported(ValueError):
    """The file is not one this reader covers (the caller falls back to transformers' GGUF loader)."""


# the struct format of each fixed-width metadata value type (strings and arrays are read by `_Cursor.value`)
_SCALARS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}
# the ggml types read here: plain values (as this torch dtype) and blocks (their sizes: GGML_QUANT_SIZES)
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_READ = {*_PLAIN, Q.Q4_0, Q.Q4_1, Q.Q8_0}

# llama.cpp's tensor names → LlamaForCausalLM's
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# metadata → config, as transformers maps a llama file
_CONFIG_KEYS = {
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "general.name": "_model_name_or_path",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first)
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # string arrays (a vocabulary) are left as their length
    tensors: list[TensorEntry]
    data_start: int


class _Cursor:
    """Little-endian reads over the file's bytes."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise Unsupported(f"{self.path.name} ends inside its header") from None
        self.pos += struct.calcsize(fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (n,) = self.unpack("<Q")
            self.pos += n

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])[0]
        if kind == V.STRING:
            return self.string()
        if kind == V.ARRAY:
            element, count = self.unpack("<IQ")
            if element == V.STRING:
                self.skip_strings(count)  # a vocabulary or merge table: the tokenizer is read elsewhere
                return count
            if element in _SCALARS:
                return list(self.unpack(f"<{count}{_SCALARS[element][1]}"))
        raise Unsupported(f"{self.path.name}: metadata value type {kind} is not one GGUF defines")


def read_header(path: Path, buf: Any) -> GGUFHeader:
    """The metadata and tensor table of the GGUF file whose bytes are `buf`."""
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise Unsupported(f"{path.name} is not a GGUF file (no GGUF magic bytes)")
    cur.pos = 4
    version, n_tensors, n_keys = cur.unpack("<IQQ")
    if version not in (2, 3):
        raise Unsupported(f"{path.name} is GGUF version {version}; this reader covers versions 2 and 3")
    metadata = {}
    for _ in range(n_keys):
        key = cur.string()
        (kind,) = cur.unpack("<I")
        metadata[key] = cur.value(kind)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        (ndim,) = cur.unpack("<I")
        dims = cur.unpack(f"<{ndim}Q")
        ggml_type, offset = cur.unpack("<IQ")
        tensors.append(TensorEntry(name, tuple(reversed(dims)), ggml_type, offset))
    align = int(metadata.get("general.alignment", 32))
    return GGUFHeader(metadata, tensors, -(-cur.pos // align) * align)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """(n_blocks, 1) fp32: the fp16 scalar at byte `at` of each block."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n_blocks, 16) bytes → (n_blocks, 32) fp32: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1).float()


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's bytes (uint8) → fp32 values of `shape`, with the `gguf` package's arithmetic."""
    if ggml_type in _PLAIN:
        return raw.view(_PLAIN[ggml_type]).float().reshape(shape)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[ggml_type][1])  # (n_blocks, bytes)
    if ggml_type == Q.Q8_0:
        values = blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)
    elif ggml_type == Q.Q4_0:
        values = _half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)
    else:  # Q4_1
        values = _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)
    return values.reshape(shape)  # (n_blocks, elements) → rows of `shape`


def _nbytes(entry: TensorEntry) -> int:
    elements, size = GGML_QUANT_SIZES[entry.ggml_type]  # plain types: (1, bytes per value)
    return math.prod(entry.shape) // elements * size


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order of a query/key projection: per head it interleaves the two halves."""
    rows = w.shape[0] // heads // 2
    return w.reshape(heads, rows, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """LlamaForCausalLM's name for a llama.cpp tensor name (Unsupported where there is none)."""
    stem = gguf_name.removesuffix(".weight")
    if stem in _TOP and gguf_name.endswith(".weight"):
        return f"{_TOP[stem]}.weight"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    raise Unsupported(f"tensor {gguf_name!r} has no LlamaForCausalLM counterpart known here")


def config_fields(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """LlamaConfig's fields from a llama file's metadata (what transformers' GGUF loader sets)."""
    if metadata.get("general.architecture") != "llama":
        raise Unsupported(f"architecture {metadata.get('general.architecture')!r} is not llama")
    fields: dict[str, Any] = {v: metadata[k] for k, v in _CONFIG_KEYS.items() if k in metadata}
    if "llama.rope.freq_base" in metadata:
        fields["rope_parameters"] = {"rope_theta": metadata["llama.rope.freq_base"], "rope_type": "default"}
    if "vocab_size" not in fields and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        fields["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # its length: string arrays are counted
    fields["tie_word_embeddings"] = "output.weight" not in tensor_names
    return fields


def read_llama(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(LlamaConfig fields, fp32 state dict in LlamaForCausalLM's names) of a llama GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = read_header(path, buf)
        names = {t.name for t in header.tensors}
        fields = config_fields(header.metadata, names)
        unknown = {t.ggml_type for t in header.tensors} - _READ
        if unknown:
            raise Unsupported(f"ggml types {sorted(unknown)} are not read here")
        heads, kv_heads = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
        state = {}
        for t in header.tensors:
            start = header.data_start + t.offset
            end = start + _nbytes(t)
            if end > len(buf):
                raise Unsupported(f"{path.name} ends inside tensor {t.name}")
            raw = torch.frombuffer(bytearray(buf[start:end]), dtype=torch.uint8)
            w = dequantize(raw, t.ggml_type, t.shape)
            if ".attn_q." in t.name and heads:
                w = _unpermute(w, heads)
            elif ".attn_k." in t.name and kv_heads:
                w = _unpermute(w, kv_heads)
            state[hf_name(t.name)] = w
    return fields, state
