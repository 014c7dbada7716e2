"""The demo decoder's GGUF reader (`twigvlm.demo.gguf_llama`) against its two references: the `gguf` package's
dequantisation (bit for bit, every block format it reads) and transformers' own GGUF loader (the checkpoint
written from a tiny llama GGUF — grouped-query attention, every block format, tied and untied heads, a BPE
tokenizer — is the same file for file, byte for byte); what it does not cover falls back to transformers."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch

from twigvlm.demo import decoder
from twigvlm.demo.gguf_llama import Unsupported, dequantize, read_llama

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFWriter  # noqa: E402
from gguf.quants import dequantize as reference_dequantize  # noqa: E402
from gguf.quants import quantize  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "ab", "Ġ", "Ġa", "abc", "ca", "bc"]
MERGES = ["a b", "Ġ a", "ab c", "c a", "b c"]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row order for a query/key projection (its converter's, which the reader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, types: dict[str, Q] | None = None, tied: bool = True, arch: str = "llama") -> None:
    """A tiny llama GGUF as llama.cpp writes one: metadata, a gpt2 BPE tokenizer, and its tensors in the given
    block formats (default: a mix of every format the reader covers)."""
    rng = np.random.default_rng(0)
    types = types or {}
    default = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1}
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def add(name: str, shape: tuple[int, ...], kind: Q, heads: int = 0) -> None:
        data = rng.standard_normal(shape).astype(np.float32)
        if heads:
            data = _permute(data, heads)
        if kind == Q.F32:
            w.add_tensor(name, data)
        elif kind == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, kind), raw_dtype=kind)

    add("token_embd.weight", (len(TOKENS), HIDDEN), types.get("token_embd", Q.Q8_0))
    for i in range(LAYERS):
        b = f"blk.{i}"
        add(f"{b}.attn_norm.weight", (HIDDEN,), Q.F32)
        add(f"{b}.attn_q.weight", (HIDDEN, HIDDEN), types.get("attn_q", default["attn_q"]), heads=HEADS)
        kv = HIDDEN // HEADS * KV_HEADS
        add(f"{b}.attn_k.weight", (kv, HIDDEN), types.get("attn_k", default["attn_k"]), heads=KV_HEADS)
        add(f"{b}.attn_v.weight", (kv, HIDDEN), types.get("attn_v", default["attn_v"]))
        add(f"{b}.attn_output.weight", (HIDDEN, HIDDEN), types.get("attn_output", default["attn_output"]))
        add(f"{b}.ffn_norm.weight", (HIDDEN,), Q.F32)
        add(f"{b}.ffn_gate.weight", (FFN, HIDDEN), types.get("ffn_gate", default["ffn_gate"]))
        add(f"{b}.ffn_up.weight", (FFN, HIDDEN), Q.Q4_1)
        add(f"{b}.ffn_down.weight", (HIDDEN, FFN), Q.Q8_0)
    add("output_norm.weight", (HIDDEN,), Q.F32)
    if not tied:
        add("output.weight", (len(TOKENS), HIDDEN), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantisation_is_the_gguf_packages_bit_for_bit(kind):
    data = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32) * 3
    data[0, :32] = 0.0  # a block of zeros (scale 0)
    data[1, :32] = 5.0  # a constant block (Q4_1's scale 0, its minimum the value)
    raw = data if kind == Q.F32 else quantize(data, kind)
    ours = dequantize(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy()), int(kind), (6, 128))
    want = reference_dequantize(raw, kind).reshape(6, 128)
    assert ours.dtype == torch.float32
    assert np.array_equal(ours.numpy().view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("tied", [True, False])
def test_the_checkpoint_is_transformers_own_file_for_file(tmp_path, tied):
    source = tmp_path / "tiny.gguf"
    write_llama_gguf(source, tied=tied)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    decoder.write_checkpoint(source, ours)
    decoder.write_checkpoint(source, theirs, fast=False)  # transformers' GGUF loader
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert filecmp.cmp(ours / name, theirs / name, shallow=False), name


def test_query_and_key_rows_are_back_in_hf_order(tmp_path):
    """The reader undoes llama.cpp's permutation: F32 tensors written permuted come back as they were."""
    source = tmp_path / "f32.gguf"
    write_llama_gguf(source, types={"attn_q": Q.F32, "attn_k": Q.F32})
    rng = np.random.default_rng(0)  # the writer's draws, in its order
    rng.standard_normal((len(TOKENS), HIDDEN))
    rng.standard_normal(HIDDEN)
    q = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    k = rng.standard_normal((HIDDEN // HEADS * KV_HEADS, HIDDEN)).astype(np.float32)
    fields, state = read_llama(source)
    assert np.array_equal(state["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    assert np.array_equal(state["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    assert fields["num_key_value_heads"] == KV_HEADS and fields["tie_word_embeddings"]


def test_what_the_reader_does_not_cover_goes_to_transformers(tmp_path):
    source = tmp_path / "q5.gguf"
    write_llama_gguf(source, types={"ffn_gate": Q.Q5_0})
    with pytest.raises(Unsupported, match=r"ggml types \[6\]"):
        read_llama(source)
    decoder.write_checkpoint(source, tmp_path / "out")  # falls back, and still writes a checkpoint
    assert (tmp_path / "out" / "model.safetensors").is_file()
    other = tmp_path / "other.gguf"
    write_llama_gguf(other, arch="qwen2")
    with pytest.raises(Unsupported, match="architecture 'qwen2' is not llama"):
        read_llama(other)


def test_a_damaged_file_is_named(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_llama_gguf(source)
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(Unsupported, match="cut.gguf ends inside tensor output_norm.weight"):
        read_llama(cut)
    cut.write_bytes(data[:200])
    with pytest.raises(Unsupported, match="cut.gguf ends inside its header"):
        read_llama(cut)
    cut.write_bytes(b"GGML" + data[4:])
    with pytest.raises(Unsupported, match="not a GGUF file"):
        read_llama(cut)
