"""The bench's llama.cpp peers: the GGUF converter (f32 and Q8_0 written from a GGUF file: every tensor the
source's dequantised values, metadata copied), the one-line "not installed" with the rest of the bench running,
the peers' rows unscored but timed, and — where llama-cpp-python is installed — a real run of the demo decoder."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from twigvlm.bench import llamacpp
from twigvlm.bench.harness import summarize
from twigvlm.bench.variants import Variant
from twigvlm.cli.main import main

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

Q8 = GGMLQuantizationType.Q8_0


def write_tiny_gguf(path) -> dict[str, np.ndarray]:
    """A small llama-style GGUF: a Q8_0 embedding and projection, an f32 norm, and string-array metadata."""
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((8, 64)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
    }
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(8)])
    w.add_file_type(7)
    for name, data in tensors.items():
        if data.ndim == 2:
            w.add_tensor(name, quantize(data, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = GGUFReader(path)
    return {t.name: dequantize(t.data, t.tensor_type) for t in source.tensors}


def test_gguf_variants_keep_the_values_and_the_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.Q8_0.gguf"
    values = write_tiny_gguf(source)
    assert llamacpp.gguf_variant(source, "q4_1") == source  # the shipped kind is the file itself
    f32 = GGUFReader(llamacpp.gguf_variant(source, "f32"))
    for t in f32.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data).reshape(values[t.name].shape), values[t.name])  # exact
    q8 = GGUFReader(llamacpp.gguf_variant(source, "q8_0"))
    for t in q8.tensors:
        got = dequantize(t.data, t.tensor_type)
        if values[t.name].ndim == 2:
            assert t.tensor_type == Q8  # re-quantising Q8_0 values to Q8_0 is lossless up to rounding
            np.testing.assert_allclose(got, values[t.name], atol=np.abs(values[t.name]).max() / 127)
        else:
            assert t.tensor_type == GGMLQuantizationType.F32 and np.array_equal(got, values[t.name])
    for reader, kind in ((f32, 0), (q8, 7)):
        assert int(reader.fields["general.file_type"].contents()) == kind
        assert reader.fields["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(8)]
        assert str(reader.fields["general.architecture"].contents()) == "llama"
    cached = llamacpp.gguf_variant(source, "f32")
    assert cached.stat().st_mtime_ns == llamacpp.gguf_variant(source, "f32").stat().st_mtime_ns  # written once
    with pytest.raises(Exception, match="kind 'q2' is unknown"):
        llamacpp.gguf_variant(source, "q2")


def test_without_llama_cpp_the_peer_says_so_and_the_rest_runs(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llamacpp, "available", lambda: "llama-cpp-python is not installed: " + llamacpp.INSTALL_HINT)
    write_tiny_gguf(tmp_path / "d.gguf")
    out = tmp_path / "o"
    argv = ["bench", "--model", model_dirs["llama-clip"], "--methods", "hf,ar,llama.cpp-q8_0", "--tasks", "scenes"]
    argv += ["--limit", "1", "--max-new-tokens", "3", "--gguf", str(tmp_path / "d.gguf"), "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert "not installed" in results["unsupported"]["llama.cpp-q8_0"]
    assert set(results["summary"]) == {"hf", "ar"}
    assert "`llama.cpp-q8_0` did not run: llama-cpp-python is not installed" in capsys.readouterr().out


def test_a_peer_without_a_gguf_file_is_one_line(model_dirs, tmp_path, capsys):
    argv = ["bench", "--model", model_dirs["llama-clip"], "--methods", "llama.cpp-f32", "--gguf", str(tmp_path / "x")]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--gguf {tmp_path / 'x'} is not a file" in err and "Traceback" not in err


def test_peer_rows_are_timed_but_not_scored():
    rows = [
        dict(task="t", sample=str(i), variant=v, method=v, score=s, tokens_per_s=tps, new_tokens=4, token_ids=[1] * 4)
        | {k: None for k in ("ttft_s", "prefill_s", "decode_s", "drafted", "accepted", "verifications", "kept")}
        for i in range(2)
        for v, s, tps in (("hf", 1.0, 10.0), ("llama.cpp-q8_0", None, 30.0))
    ]
    summary = summarize(rows, [Variant("hf", "hf"), Variant("llama.cpp-q8_0", "llama.cpp-q8_0")])
    peer = summary["llama.cpp-q8_0"]
    assert peer["accuracy"] == {} and peer["rel_acc"] is None and peer["rel_spd"]["median"] == 3.0


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the peers extra is not installed")
def test_llama_cpp_decodes_the_demo_decoder():
    from twigvlm.demo.decoder import gguf_path

    try:
        path = gguf_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    peer = llamacpp.LlamaCpp(path, n_ctx=64)
    try:
        run = peer.run(list(range(100, 120)), 5)
        again = peer.run(list(range(100, 120)), 5)
    finally:
        peer.close()
    assert len(run.token_ids) == 5 and run.prefill_s > 0 and run.decode_s > 0
    assert run.token_ids == again.token_ids  # greedy from a reset context
