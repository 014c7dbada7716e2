"""`twigvlm bench` on a tiny random model: every method runs and the outputs are well formed; `ar` scores exactly
as `hf` and matches it token for token; lossless pairs match; malformed task files name the file and line."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import twigvlm
from twigvlm.bench.ablations import wipe_layers
from twigvlm.bench.cli import BenchTwig, variants
from twigvlm.bench.memory import cpu_memory_supported, measure
from twigvlm.bench.sample import exact_match, normalize
from twigvlm.bench.tasks import from_files
from twigvlm.bench.variants import MethodConfig, prune_config
from twigvlm.cli.main import main
from twigvlm.errors import TwigVLMError
from twigvlm.runtime import native

from .conftest import random_image


@pytest.fixture(scope="module")
def bench_twig(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--out", str(out)]) == 0
    return str(out)


def _file_task(folder, vlm, n=3):
    """A LLaVA-format task whose gold answers are the stock model's own greedy outputs (so hf scores 1.0)."""
    (folder / "img").mkdir(parents=True)
    questions, answers = [], []
    for i in range(n):
        random_image(i).save(folder / "img" / f"{i}.png")
        text = ["what color is it?", "how many shapes?", "describe it"][i % 3]
        ids = vlm.adapter.hf_generate(text, [random_image(i).convert("RGB")], 4)
        eos = set(vlm.adapter.eos_token_ids)
        questions.append({"question_id": i, "image": f"{i}.png", "text": text})
        answers.append({"question_id": i, "answer": vlm.adapter.decode([t for t in ids if t not in eos])})
    (folder / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return f"mine={folder / 'q.jsonl'},{folder / 'img'},{folder / 'a.jsonl'}"


def test_every_method_runs_and_outputs_are_well_formed(model_dirs, bench_twig, tmp_path, capsys):
    out = tmp_path / "out"
    vlm = twigvlm.load(model_dirs["llama-clip"])
    spec = _file_task(tmp_path / "task", vlm)
    argv = [
        "bench",
        "--model",
        model_dirs["llama-clip"],
        "--twig",
        bench_twig,
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--keep-ratio",
        "0.5",
        "--out",
        str(out),
        "--tasks",
        f"easyvqa,scenes,describe;{spec}",
        "--methods",
        "hf,hf-early-exit,ar,fastv,visionzip,cdpruner,dart,twig,ssd,twig+ssd",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | RelAcc |" in printed
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    ran = {"hf", "ar", "fastv", "visionzip", "cdpruner", "dart", "twig", "ssd", "twig+ssd"}
    assert ran <= set(summary) and set(summary) | set(results["unsupported"]) == ran | {"hf-early-exit"}
    # transformers' early exit reads a decoder-only config (num_hidden_layers at the top): not a LLaVA's
    early = results["unsupported"]["hf-early-exit"]
    assert early.startswith("transformers' assistant_early_exit does not run on this model") and "LlavaConfig" in early
    assert results["machine"]["torch"] and results["config"]["limit"] == 2
    assert results["config"]["kernels"] == "stock"  # the resolved mode (the suite's TWIGVLM_KERNELS), not None
    kernel = results["machine"]["native kernel"]
    assert kernel == "built" if native._compiler() else kernel.startswith("unavailable: no C compiler")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(summary) * (3 * 2 + 2)  # 3 built-in tasks × 2 + the file task's 2
    assert all(r["new_tokens"] <= 4 and r["tokens_per_s"] > 0 for r in rows)
    # The lossless pairs and our plain engine match their references token for token.
    assert summary["ar"]["same_as"] == "hf" and summary["ar"]["mismatches"] == 0
    assert summary["ssd"]["mismatches"] == 0 and summary["twig+ssd"]["mismatches"] == 0
    # On the file task hf scores 1.0 by construction, so ar's RelAcc is exactly 1.0.
    assert summary["hf"]["accuracy"]["mine"] == 1.0 and summary["ar"]["accuracy"]["mine"] == 1.0
    assert summary["ar"]["rel_acc"] == 1.0
    assert 0 < summary["ssd"]["acceptance"] <= 1 and summary["twig"]["kept"] > 0
    assert set(summary["twig"]["sign_tests"]) == {"fastv", "visionzip", "cdpruner", "dart"}
    assert "sign test, `twig` against `dart`" in printed
    assert (out / "plot.png").stat().st_size > 1000 and (out / "table.md").is_file()
    # Our engine's runs split prefill from decoding; every method's peak memory is measured on a first sample.
    assert summary["ar"]["prefill_ms"]["median"] > 0 and "prefill_ms" not in summary["hf"]
    # time to first token = encoding + prefill, per sample
    assert all(r["ttft_s"] >= r["prefill_s"] > 0 for r in rows if r["variant"] == "ar")
    assert summary["ar"]["ttft_ms"]["median"] >= summary["ar"]["prefill_ms"]["median"]
    if cpu_memory_supported():
        first_ids = {r["task"]: r["sample"] for r in reversed(rows)}  # rows run in sample order
        firsts = [r for r in rows if r["sample"] == first_ids[r["task"]]]
        assert firsts and all(r["extra_mib"] >= 0 and r["peak_mib"] > 100 for r in firsts)
        assert all(summary[m]["memory_mib"]["peak"] > 0 for m in ran)


def test_peak_memory_follows_what_a_run_allocates():
    if not cpu_memory_supported():
        pytest.skip("no /proc/self/clear_refs here")
    for mib in (64, 16, 128):
        total, peak = measure(lambda mib=mib: float(torch.ones(mib, 2**18).sum()))  # mib MiB of fp32
        assert total == mib * 2**18
        assert mib - 2 <= peak.extra_mib <= mib + 24 and peak.peak_mib >= peak.extra_mib


def _ablation(model: str, twig: str, out: Path, ablation: str, *extra: str) -> dict:
    """One bench ablation on one scene sample, 3 new tokens; its results.json."""
    argv = [
        "bench",
        "--model",
        model,
        "--twig",
        twig,
        "--limit",
        "1",
        "--max-new-tokens",
        "3",
        "--tasks",
        "scenes",
        "--out",
        str(out),
        "--ablation",
        ablation,
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_ablations_expand_into_variants(model_dirs, bench_twig, tmp_path, capsys):
    summary = _ablation(model_dirs["llama-clip"], bench_twig, tmp_path / "d", "draft")["summary"]
    assert {"hf", "ar", "ssd γ=1 τ=0.0", "ssd γ=8 τ=0.6"} <= set(summary)
    assert all(summary[k]["mismatches"] == 0 for k in summary if k.startswith("ssd"))


def _variant_args(**given) -> Namespace:
    """The bench options `variants` reads, at their defaults, with `given` on top."""
    defaults = dict(keep=None, keep_ratio=1 / 9, wipe_layer=None, draft_len=5, draft_threshold=0.6, query="last")
    return Namespace(**{**defaults, **given})


@pytest.mark.parametrize(
    "ablation,methods",
    [("twig", None), ("none", "hf,fastv,visionzip,twig,twig+ssd"), ("source", None), ("budget", None), ("query", None)],
)
def test_every_variant_wipes_where_the_runs_own_twig_says(ablation, methods):
    args = _variant_args(ablation=ablation, methods=methods, twig="own")
    own, other = BenchTwig("own", 2, 3, 26), BenchTwig("other", 2, 1, None)
    assert {v.config.wipe_layer for v in variants(args, {"own": own, "other": other}, 30)} == {26}
    # The run's own twig records none: round(0.75·L) for every variant, not each twig's own.
    assert {v.config.wipe_layer for v in variants(args, {"other": other, "own": own}, 30)} == {23}
    args.wipe_layer = 24
    assert {v.config.wipe_layer for v in variants(args, {"own": own, "other": other}, 30)} == {24}


def test_prune_layer_moves_fastv_and_dart_and_the_wipe_follows():
    """--prune-layer K: FastV and DART prune after layer K (the twig keeps its own), and a K_f that would come
    before it (the twig's record, or the default) moves after it."""
    args = _variant_args(ablation="none", methods="hf,fastv,dart,twig", twig="own", prune_layer=27)
    rows = {v.method: prune_config(v.method, v.config) for v in variants(args, {"own": BenchTwig("own", 2, 3, 26)}, 30)}
    assert (rows["fastv"].layer, rows["dart"].layer, rows["twig"].layer) == (27, 27, None)
    assert {rows[m].wipe_layer for m in ("fastv", "dart", "twig")} == {28}
    args.prune_layer = None
    rows = {v.method: prune_config(v.method, v.config) for v in variants(args, {"own": BenchTwig("own", 2, 3, 26)}, 30)}
    assert (rows["fastv"].layer, rows["fastv"].wipe_layer) == (None, 26)


def test_budget_and_wipe_ablations_run_without_a_twig():
    """A base with no twig yet (a new demo base) can still be asked how prunable it is."""
    args = _variant_args(ablation="budget", methods=None, twig=None)
    budget = variants(args, {}, 30)
    assert {v.method for v in budget} == {"hf", "fastv", "visionzip"} and len(budget) == 1 + 2 * 3
    args.ablation = "wipe"
    assert {v.method for v in variants(args, {}, 30)} == {"hf", "ar", "fastv"}


def test_query_ablation_scores_with_each_query(model_dirs, bench_twig, tmp_path):
    results = _ablation(model_dirs["llama-clip"], bench_twig, tmp_path / "q", "query", "--keep-ratio", "0.5")
    names = ["fastv (last)", "fastv (text)", "twig (last)", "twig (text)"]
    assert set(results["summary"]) == {"hf", *names}, results["unsupported"]
    assert [v["query"] for v in results["config"]["variants"][1:]] == ["last", "text", "last", "text"]
    assert prune_config("twig+ssd", MethodConfig(query="text")).query == "text"
    assert prune_config("fastv", MethodConfig()).query == "last"  # the paper's


def test_source_ablation_moves_the_attention_not_the_budget(model_dirs, bench_twig, tmp_path):
    out = tmp_path / "s"
    results = _ablation(
        model_dirs["llama-clip"],
        bench_twig,
        out,
        "source",
        "--keep-ratio",
        "0.9",
        "--wipe-layer",
        str(twigvlm.load(model_dirs["llama-clip"]).adapter.spec.num_layers),
    )
    summary, variants = results["summary"], {v["name"]: v for v in results["config"]["variants"]}
    names = ["attn: base layer K=2", "attn: base layer K+T=5", "attn: twig layer 3"]
    assert set(names) <= set(summary), results["unsupported"]
    assert variants[names[0]]["layer"] == 2 and variants[names[1]]["twig"] == "__untrained__"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    kept = {r["variant"]: r["kept"] for r in rows}
    assert kept[names[0]] == kept[names[1]] == kept[names[2]]  # one budget, one pruning layer


def test_base_layer_K_plus_T_attention_is_an_untrained_twigs():
    """The source ablation scores with an untrained twig: its last layer's attention is base layer K+T's."""
    from twigvlm.config import PruneConfig
    from twigvlm.pruning.prefill import _score, plan_pruning
    from twigvlm.tiny.llava import TinySpec, build_tiny_llava

    model, processor = build_tiny_llava(TinySpec(num_layers=6, seed=4))
    vlm = twigvlm.VLM.from_model(model, processor)
    vlm.grow_twig(K=2, T=3)
    encoded = vlm.encode("what is it?", random_image(1))
    plan = plan_pruning(PruneConfig("twig", keep_ratio=0.5), 6, encoded.num_visual_tokens, 2)
    with torch.no_grad():
        _, scores = _score(vlm.engine, vlm.engine.new_state(), encoded, plan, "last")
        model.set_attn_implementation("eager")  # HF's own attention weights, from the stock model
        out = model.model.language_model(
            inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, output_attentions=True
        )
        model.set_attn_implementation("sdpa")
    attn = out.attentions[4][0, :, -1].mean(0)  # base layer K+T = 5 (1-based), last query, heads averaged
    torch.testing.assert_close(scores, attn[encoded.visual_mask[0]], rtol=1e-5, atol=1e-6)


def test_twig_ablation_runs_each_twig_and_checks_each_against_itself(model_dirs, bench_twig, tmp_path):
    other = tmp_path / "t1"
    assert (
        main(["grow", "--model", model_dirs["llama-clip"], "--T", "1", "--layer-init", "last", "--out", str(other)])
        == 0
    )
    out = tmp_path / "o"
    argv = [
        "bench",
        "--model",
        model_dirs["llama-clip"],
        "--twig",
        f"{bench_twig},{other}",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--tasks",
        "scenes",
        "--out",
        str(out),
        "--ablation",
        "twig",
        "--keep-ratio",
        "0.5",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert not results["unsupported"]
    for label in ("K=2 T=3 next", "K=2 T=1 last"):
        assert summary[f"twig+ssd [{label}]"]["same_as"] == f"twig [{label}]"
        assert summary[f"twig+ssd [{label}]"]["mismatches"] == 0
    twigs = {v["name"]: v["twig"] for v in results["config"]["variants"]}
    assert twigs["twig [K=2 T=1 last]"] == str(other) and twigs["twig [K=2 T=3 next]"] == bench_twig
    # Each twig drafted on each of the 2 samples (a step always makes its first draft): both twigs really ran.
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for label in ("K=2 T=3 next", "K=2 T=1 last"):
        mine = [r for r in rows if r["variant"] == f"twig+ssd [{label}]"]
        assert len(mine) == 2 and all(r["drafted"] >= 1 for r in mine), (label, mine)


def test_wipe_ablation_keeps_everything_up_to_the_wipe_layer(model_dirs, bench_twig, tmp_path):
    out = tmp_path / "w"
    results = _ablation(model_dirs["llama-clip"], bench_twig, out, "wipe", "--keep-ratio", "0.5")
    assert not results["unsupported"]
    L = twigvlm.load(model_dirs["llama-clip"]).adapter.spec.num_layers
    layers = wipe_layers(L, 2)
    assert layers and all(2 < k < L for k in layers)
    rows = {r["variant"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    for k in layers:
        assert rows[f"keep all, wipe after {k}"]["kept"] == rows[f"keep all, wipe after {k}"]["visual_tokens"]  # R' = M
        assert rows[f"twig, wipe after {k}"]["kept"] < rows[f"twig, wipe after {k}"]["visual_tokens"]
    assert wipe_layers(32, 2) == [19, 24, 27] and wipe_layers(30, 2) == [18, 23, 26]


def test_normalization_and_exact_match():
    assert normalize("The Red circle.") == "red circle"
    assert normalize("Two") == "2" and normalize("3.5") == "3.5"
    assert exact_match("Yes!", ["yes", "yeah"]) == 1.0 and exact_match("no", ["yes"]) == 0.0


@pytest.mark.parametrize(
    "content,name,why",
    [
        ('{"question_id": 1, "text": "q", "image": "a.png"}\n{oops\n', "q", "line 2 is not JSON"),
        ('{"question_id": 1}\n', "q", "line 1: needs 'question_id' and 'text'"),
        ('{"question_id": 1, "text": "q", "image": "nope.png"}\n', "q", "line 1: image .*nope.png does not exist"),
        ('{"question_id": 1, "answers": [3]}\n', "a", "line 1: needs 'question_id' and 'answer'"),
    ],
)
def test_malformed_task_files_name_file_and_line(tmp_path, content, name, why):
    random_image(0).save(tmp_path / "a.png")
    files = {"q": '{"question_id": 1, "text": "q", "image": "a.png"}\n', "a": '{"question_id": 1, "answer": "x"}\n'}
    files[name] = content
    for k, text in files.items():
        (tmp_path / f"{k}.jsonl").write_text(text)
    with pytest.raises(TwigVLMError, match=f"{name}.jsonl {why}"):
        from_files("t", tmp_path / "q.jsonl", tmp_path, tmp_path / "a.jsonl")


def test_bench_errors_exit_2(model_dirs, tmp_path, capsys):
    base = ["bench", "--model", model_dirs["llama-clip"], "--out", str(tmp_path / "o")]
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "q", "image": "a.png"}\n')
    random_image(0).save(tmp_path / "a.png")
    png = tmp_path / "a.png"  # a picture given as a task's file (was a UnicodeDecodeError traceback, exit 1)
    for argv, why in [
        (base + ["--tasks", f"mmbench={png}"], f"task file {png} is not UTF-8 text (byte 0)"),
        (base + ["--tasks", f"mine={tmp_path / 'q.jsonl'},{tmp_path},{png}"], f"task file {png} is not UTF-8"),
        (base + ["--methods", "ar,warp"], "unknown method 'warp'"),
        (base + ["--methods", "twig"], "need a twig"),
        (base + ["--tasks", "nope", "--methods", "hf,ar"], "unknown task 'nope'"),
        (base + ["--tasks", " , ", "--methods", "hf,ar"], "--tasks is empty"),  # was a StopIteration traceback
        (base + ["--tasks", f"mme={tmp_path / 'q.jsonl'}"], "is a file: give the folder of pictures"),
        (base + ["--tasks", f"mmbench={tmp_path}"], f"task file {tmp_path} is a folder: give the file itself"),
        (base + ["--limit", "0"], "--limit: 0 is not positive"),
        (base + ["--ablation", "source"], "--ablation source needs a twig"),
        (base + ["--ablation", "twig", "--twig", str(tmp_path)], "is not a twig directory"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err


def test_bench_checks_every_flag_against_the_model_first(model_dirs, bench_twig, tmp_path, capsys, monkeypatch):
    # Were any sample to run, this stub would end the test with an AssertionError instead of exit 2.
    def no_sample(*args, **kwargs):
        raise AssertionError("a sample ran before the flags were checked")

    monkeypatch.setattr("twigvlm.bench.harness.run_method", no_sample)
    out = tmp_path / "o"
    base = ["bench", "--model", model_dirs["llama-clip"], "--twig", bench_twig, "--tasks", "scenes", "--limit", "1"]
    base += ["--out", str(out)]
    L = twigvlm.load(model_dirs["llama-clip"]).adapter.spec.num_layers
    for argv, why in [
        (["--wipe-layer", "99"], f"wipe_layer=99 is invalid: it must be between K+1=3 and L={L}"),
        (["--methods", "hf,fastv", "--wipe-layer", "99"], "fastv cannot run on scenes: wipe_layer=99"),
        (["--methods", "hf,fastv", "--keep", "0.5"], "is infeasible for this model and prompt (M=16"),
        (["--methods", "hf,fastv", "--keep", "0.5"], "at most 13.3 (--keep sets it)"),
        (["--methods", "hf,fastv", "--keep-ratio", "0.05"], "(keep_ratio=0.05 of M=16) is infeasible"),
        (["--methods", "hf,visionzip", "--keep", "100"], "VisionZip budget of 100.0 visual tokens (keep=100)"),
        (["--ablation", "budget", "--wipe-layer", "99"], "wipe_layer=99 is invalid"),
        (["--keep-ratio", "2"], "keep_ratio=2.0 is invalid"),
        (["--methods", "hf,fastv", "--prune-layer", "99"], "pruning layer K=99 is invalid"),
        (["--methods", "hf,ssd", "--draft-len", "0"], "--draft-len: 0 is not positive"),
        (["--methods", "hf,ssd", "--draft-threshold", "1.5"], "threshold=1.5 is invalid"),
    ]:
        assert main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not out.exists()


def test_visual_token_count_from_the_processor_matches_the_encoding(vlms):
    from twigvlm.bench.methods import visual_tokens
    from twigvlm.bench.sample import Sample

    for vlm in vlms.values():
        sample = Sample("t", "0", "what is it?", lambda: random_image(3), ["x"])
        assert visual_tokens(vlm, sample) == vlm.encode(sample.prompt, sample.image()).num_visual_tokens
        assert visual_tokens(vlm, Sample("t", "1", "hi", None, ["x"])) == 0


def test_weights_ablation_pairs_each_int8_row_with_its_own_twin(model_dirs, bench_twig, tmp_path):
    out = tmp_path / "w"
    results = _ablation(
        model_dirs["llama-clip"], bench_twig, out, "weights", "--max-new-tokens", "6", "--keep-ratio", "0.5"
    )
    summary = results["summary"]
    assert set(summary) == {"hf", *(f"{m}{q}" for m in ("ar", "twig", "ssd", "twig+ssd") for q in ("", " int8"))}
    # lossless pairs stay within one kind of weights; ar on int8 weights has no lossless twin (another model)
    assert summary["ssd int8"]["same_as"] == "ar int8" and summary["twig+ssd int8"]["same_as"] == "twig int8"
    assert summary["ssd"]["same_as"] == "ar" and "same_as" not in summary["ar int8"]
    assert all(summary[k]["mismatches"] == 0 for k in summary if "same_as" in summary[k])
    for m in ("ar", "twig", "ssd", "twig+ssd"):
        assert summary[f"{m} int8"]["int8_of"] == m and 0 <= summary[f"{m} int8"]["agreement_64"] <= 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ids = {r["variant"]: r["token_ids"] for r in rows}
    assert summary["ar int8"]["agreement_64"] == _agreement_of(ids["ar"], ids["ar int8"])
    assert "cpu flags" in results["machine"] and "int8" in (out / "table.md").read_text()


def _agreement_of(reference: list[int], ids: list[int]) -> float:
    """The common prefix within the reference's first 64 tokens, as a share of them (written plainly)."""
    ref, same = reference[:64], 0
    while same < min(len(ref), len(ids)) and ref[same] == ids[same]:
        same += 1
    return same / len(ref)


def test_the_sign_test_against_the_pruning_peers():
    from types import SimpleNamespace

    from twigvlm.bench.compare import against_peers, sign_test

    assert sign_test(10, 0) == 2 / 2**10 and sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert abs(sign_test(3, 12) - 2 * sum(math.comb(15, k) for k in range(4)) / 2**15) < 1e-15  # 0.0352
    rows = [
        {"variant": v, "task": "t", "sample": i, "score": s}
        for v, scores in {"twig": [1, 1, 0, 1, 0.5], "fastv": [0, 1, 0, 0, 1], "ar": [1, 1, 1, 1, 1]}.items()
        for i, s in enumerate(scores)
    ]
    variants = [SimpleNamespace(name=n, method=n) for n in ("twig", "fastv", "ar")]
    tests = against_peers(rows, variants)
    assert tests == {"twig": {"fastv": {"wins": 2, "losses": 1, "ties": 2, "p": 1.0}}}  # ar is no pruning peer


def test_head_ablation_runs_both_heads_and_tests_the_head_against_the_attention_row(
    model_dirs, bench_twig, tmp_path, capsys
):
    vlm = twigvlm.load(model_dirs["llama-clip"], twig=bench_twig)
    vlm.twig.add_prune_head(vlm.adapter.query_width)
    vlm.save_twig(tmp_path / "headed")
    budget = ("--limit", "2", "--keep-ratio", "0.5")
    summary = _ablation(model_dirs["llama-clip"], str(tmp_path / "headed"), tmp_path / "d", "head", *budget)["summary"]
    assert {"twig (attention)", "twig (pruning head)"} <= set(summary)
    assert set(summary["twig (pruning head)"]["sign_tests"]) == {"twig (attention)"}
    # a twig without a head: a one-line error before anything runs
    argv = ["bench", "--model", model_dirs["llama-clip"], "--twig", bench_twig, "--ablation", "head", *budget]
    capsys.readouterr()
    assert main([*argv, "--tasks", "scenes", "--out", str(tmp_path / "p")]) == 2
    assert "no pruning head" in capsys.readouterr().err


def test_batch_mode_runs_batched_rows_against_stocks_padded_batch(model_dirs, bench_twig, tmp_path, capsys):
    out = tmp_path / "b"
    methods = "hf,ar,fastv,twig,ssd,twig+ssd"
    argv = ["bench", "--model", model_dirs["llama-clip"], "--twig", bench_twig, "--tasks", "scenes", "--limit", "5",
            "--max-new-tokens", "4", "--keep-ratio", "0.5", "--batch", "2", "--methods", methods,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "batch.json").read_text())["summary"]
    assert list(rows) == ["hf", "ar", "fastv", "twig", "ssd", "twig+ssd", "ar ×1", "twig+ssd ×1"]
    assert all(
        r["requests"] == 5 and r["tokens_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] for r in rows.values()
    )
    assert rows["ar"]["batch"] == 2 and rows["ar ×1"]["batch"] == 1
    assert rows["ar ×1"]["same_ids_as_hf"] == rows["ar"]["same_ids_as_hf"]  # batched ar ≡ ar alone, request by request
    assert rows["ssd"]["same_ids_as_hf"] == rows["ar"]["same_ids_as_hf"]  # drafting in a batch is lossless
    assert rows["twig+ssd"]["same_ids_as_hf"] == rows["twig"]["same_ids_as_hf"] == rows["twig+ssd ×1"]["same_ids_as_hf"]
    assert rows["ar ×1"]["x_ar_one_at_a_time"] == 1.0 and rows["ar"]["x_ar_one_at_a_time"] > 0
    assert "| ar ×1 | 1 |" in capsys.readouterr().out
    bad = [*argv[:-4], "--methods", "hf,hf-early-exit", "--out", str(tmp_path / "c")]
    assert main(bad) == 2
    assert "hf-early-exit cannot run batched yet" in capsys.readouterr().err
