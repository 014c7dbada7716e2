"""The oracles on a CUDA device (`pytest -m gpu`; skipped without one): engine greedy ≡ HF generate, pruning ≡
the masked full model, SSD ≡ AR, compiled decode steps ≡ eager ones (compiled, and loaded from the program cache),
a batch ≡ its solo runs, and a seed's one text whatever decodes it (positional sampling). In float32 every oracle
must hold exactly as on the CPU (TF32 off); in bfloat16 the engine must match HF except where HF's own top-2
logits are tied within bf16's resolution (for a sampled token: its top-2 perturbed scores)."""

from __future__ import annotations

import copy

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig
from twigvlm.config import TwigConfig
from twigvlm.runtime.sampling import PositionalNoise
from twigvlm.tiny.llava import TinySpec, build_tiny_llava
from twigvlm.twig.model import grow_twig

from .conftest import random_image, random_prompt
from .oracles import (
    assert_every_draft_accepted,
    assert_speculation_equals_ar,
    masked_reference_logits,
    pruned_greedy,
    stock_greedy,
    stock_logits,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = {
    "llama-clip": TinySpec(num_layers=8, image_size=64, tie_embeddings=False, seed=4),
    "qwen2-siglip": TinySpec(backbone="qwen2", tower="siglip", num_layers=8, image_size=64, seed=5),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 on the GPU means float32: TF32 matmuls and convolutions would round like bf16-ish operands."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request) -> tuple[twigvlm.VLM, twigvlm.VLM]:
    """(the model on the CPU, the same model and twig on CUDA), float32, a twig that differs from its layers."""
    model, processor = build_tiny_llava(SPECS[request.param])
    cpu = twigvlm.VLM.from_model(model, processor)
    twig = grow_twig(cpu.adapter, TwigConfig(K=2, T=3))
    with torch.no_grad():
        for p in twig.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpu = twigvlm.VLM(cpu.adapter, twig)
    gpu = twigvlm.VLM.from_model(copy.deepcopy(model).cuda(), processor, copy.deepcopy(twig).cuda())
    return cpu, gpu


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_engine_greedy_equals_hf_generate_fp32(pair, with_image):
    _, gpu = pair
    for seed in range(5):
        prompt, images = random_prompt(seed, 1 + 6 * seed), [random_image(seed)] if with_image else []
        ours = gpu.generate(prompt, image=images, max_new_tokens=12, ignore_eos=True).token_ids
        assert ours == stock_greedy(gpu, prompt, images, 12), seed


def test_engine_greedy_equals_hf_generate_bf16_up_to_ties(pair):
    _, gpu = pair
    bf16 = twigvlm.VLM.from_model(copy.deepcopy(gpu.adapter.model).to(torch.bfloat16), gpu.adapter.processor)
    exact = 0
    for seed in range(8):
        prompt, images = random_prompt(seed, 3 + 4 * seed), [random_image(seed)]
        ours = bf16.generate(prompt, image=images, max_new_tokens=12, ignore_eos=True).token_ids
        ref, logits = stock_greedy(bf16, prompt, images, 12, logits=True)
        if ours == ref:
            exact += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
        top2 = logits[i].topk(2).values
        resolution = 2.0**-7 * float(top2[0].abs()) * 4  # a few bf16 ulps of the winning logit
        assert float(top2[0] - top2[1]) <= resolution, (seed, i, top2.tolist())
    assert exact >= 6, f"only {exact}/8 bf16 runs matched HF exactly"


@pytest.mark.parametrize("method", ["twig", "fastv"])
def test_pruning_equals_the_masked_full_model(pair, method):
    cpu, gpu = pair
    K, wipe = 2, 6
    cfg = PruneConfig(method, keep=50.0, wipe_layer=wipe)
    prompt, images = random_prompt(11, 6), [random_image(1), random_image(2)]
    enc = gpu.encode(prompt, images)
    ours, ids, stats, _ = pruned_greedy(gpu, enc, cfg, 6)
    with torch.no_grad():  # the reference runs on the CPU in float32
        ref = masked_reference_logits(cpu, cpu.encode(prompt, images), ids, torch.tensor(stats.kept_indices), K, wipe)
    torch.testing.assert_close(ours.cpu(), ref[enc.num_tokens - 1 : -1], rtol=1e-4, atol=1e-4)
    assert ids == ref[enc.num_tokens - 1 : -1].argmax(-1).tolist()


@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=30.0)], ids=["unpruned", "pruned"])
def test_speculation_equals_ar(pair, prune):
    _, gpu = pair
    exact_copy = twigvlm.VLM(gpu.adapter, grow_twig(gpu.adapter, TwigConfig(K=2, T=gpu.adapter.spec.num_layers - 2)))
    cases = ((0, 1), (1, 3), (2, 5))
    for vlm, name in ((gpu, "noisy twig"), (exact_copy, "copy of the deep layers")):
        results = assert_speculation_equals_ar(vlm, cases, prune, name)
        if vlm is exact_copy and prune is None:
            for sd, (_, gamma) in zip(results, cases, strict=True):
                assert_every_draft_accepted(sd, gamma)


def first_difference_is_a_tie(vlm: twigvlm.VLM, args: dict, ours: list[int], ref: list[int]) -> bool:
    """Where two greedy runs first differ, the reference's top-2 logits are within a few bf16 ulps."""
    i = next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    _, logits = stock_greedy(vlm, args["prompt"], [args["image"]], len(ref), logits=True)
    top2 = logits[i].topk(2).values
    return float(top2[0] - top2[1]) <= 2.0**-7 * float(top2[0].abs()) * 4


@pytest.mark.parametrize("method", ["ar", "twig", "ssd", "twig+ssd"])
def test_compiled_steps_equal_eager_on_cuda(pair, method):
    """`--compile on` on CUDA: the same greedy ids as the eager engine in float32; in bf16, up to near ties."""
    _, gpu = pair
    prune = PruneConfig("twig", keep=30.0) if method.startswith("twig") else None
    spec = SpecConfig(draft_len=3, threshold=0) if method.endswith("ssd") else False
    bf16 = twigvlm.VLM.from_model(
        copy.deepcopy(gpu.adapter.model).to(torch.bfloat16),
        gpu.adapter.processor,
        copy.deepcopy(gpu.twig).to(torch.bfloat16),
    )
    for vlm, exact in ((gpu, True), (bf16, False)):
        for seed in range(3):
            args = dict(prompt=random_prompt(seed, 3 + 5 * seed), image=random_image(seed))
            run = dict(**args, max_new_tokens=16, ignore_eos=True, prune=prune, speculative=spec)
            vlm.set_compile("off")
            eager = vlm.generate(**run).token_ids
            vlm.set_compile("on")
            ours = vlm.generate(**run).token_ids
            vlm.set_compile("off")
            assert ours == eager or (not exact and first_difference_is_a_tie(vlm, args, ours, eager)), (seed, exact)
        assert vlm.adapter._step_programs.stats.calls > 0 and not vlm.adapter._step_programs.stats.failures


def test_a_fresh_vlm_loads_the_compiled_programs_on_cuda(pair, tmp_path, monkeypatch):
    """The program cache on CUDA: a second VLM on a copy of the model loads the programs the first one compiled
    (drafting: all three kinds), compiles none, and gives the eager ids."""
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    _, gpu = pair

    def fresh() -> twigvlm.VLM:
        return twigvlm.VLM.from_model(copy.deepcopy(gpu.adapter.model), gpu.adapter.processor, copy.deepcopy(gpu.twig))

    run = dict(prompt=random_prompt(7, 6), image=random_image(7), max_new_tokens=16, ignore_eos=True,
               speculative=SpecConfig(draft_len=3, threshold=0))  # fmt: skip
    first, later = fresh(), fresh()
    eager = first.generate(**run).token_ids
    first.set_compile("on")
    assert first.generate(**run).token_ids == eager
    compiled = first.adapter._step_programs.stats
    later.set_compile("on")
    assert later.generate(**run).token_ids == eager
    loaded = later.adapter._step_programs.stats
    assert loaded.loaded == loaded.programs == compiled.programs > 0 and compiled.loaded == 0 and loaded.calls > 0


def assert_batch_equals_solo(vlm: twigvlm.VLM, compile_mode: str) -> None:
    """A chain row, a tree row, a TTP row and a plain row in one batch give their solo runs' greedy ids."""
    drafts = [
        SpecConfig(draft="chain", draft_len=3, threshold=0.0),
        SpecConfig(draft="tree", tree_nodes=6, tree_depth=3, tree_topk=2, threshold=0.0),
        False,
        False,
    ]
    requests = [
        dict(prompt=random_prompt(40 + i, 3 + 3 * i), image=random_image(40 + i), max_new_tokens=10 + 3 * i,
             ignore_eos=True, speculative=d, prune=PruneConfig("twig", keep=30.0) if i == 2 else None)
        for i, d in enumerate(drafts)
    ]  # fmt: skip
    vlm.set_compile(compile_mode)
    try:
        together = [r.token_ids for r in vlm.generate(requests)]
        alone = [vlm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}).token_ids for r in requests]
    finally:
        vlm.set_compile("off")
    assert together == alone


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_a_batch_of_chains_and_trees_equals_its_solo_runs_on_cuda(pair, compile_mode):
    """float32 on CUDA, eager and with the compiled batched programs (one token and a block per row)."""
    _, gpu = pair
    assert_batch_equals_solo(gpu, compile_mode)


SAMPLED = dict(temperature=0.8, ignore_eos=True)  # no top-p: a bf16 rounding at its edge is not a tie of scores
DRAFTERS = {
    "chain": SpecConfig(draft="chain", draft_len=3, threshold=0.0),
    "tree": SpecConfig(draft="tree", tree_nodes=6, tree_depth=3, tree_topk=2, threshold=0.0),
    "auto": SpecConfig(),
}


def seeded_texts(vlm: twigvlm.VLM, seed: int, prune: PruneConfig | None) -> tuple[dict, dict[str, list[int]]]:
    """One seeded request decoded plainly, with each drafter, and as a drafting row of a batch beside a greedy row
    (the request and each way's ids)."""
    request = dict(prompt=random_prompt(60 + seed, 3 + 2 * seed), image=random_image(60 + seed), max_new_tokens=16,
                   seed=seed, prune=prune, **SAMPLED)  # fmt: skip
    args = {k: v for k, v in request.items() if k != "prompt"}
    ids = {"plain": vlm.generate(request["prompt"], **args).token_ids}
    for name, spec in DRAFTERS.items():
        ids[name] = vlm.generate(request["prompt"], **args, speculative=spec).token_ids
    greedy = dict(prompt=random_prompt(70 + seed, 5), image=random_image(70 + seed), max_new_tokens=9, ignore_eos=True)
    ids["batch"] = vlm.generate([dict(request, speculative=DRAFTERS["chain"]), greedy])[0].token_ids
    return request, ids


def first_difference_is_a_perturbed_tie(vlm: twigvlm.VLM, request: dict, ours: list[int], ref: list[int]) -> bool:
    """Where a seeded run first differs from the plain one, the plain token's top-2 perturbed scores (the stock
    model's logits at that index, tempered, plus the index's noise) are within a few bf16 ulps of the logits."""
    i = next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    logits = stock_logits(vlm, request["prompt"], [request["image"]], [], ref[:i])[-1:].float()  # [1, V]: index i
    cfg = GenConfig(temperature=request["temperature"], seed=request["seed"])
    top2 = PositionalNoise(request["seed"]).scores(logits, cfg, [i])[0].topk(2).values
    return float(top2[0] - top2[1]) <= 2.0**-7 * float(logits.abs().max()) * 4 / cfg.temperature


def test_a_seed_gives_one_text_however_it_is_decoded_on_cuda(pair):
    """Positional sampling on CUDA: a seeded request's plain ids with chains, trees and auto's choice, pruned or
    not, alone and in a batch: exactly in float32; in bf16 (unpruned, where the stock model is the reference) up to
    near ties of the perturbed scores, most of them exactly."""
    _, gpu = pair
    for seed in range(3):
        for prune in (None, PruneConfig("twig", keep=30.0)):
            _, ids = seeded_texts(gpu, seed, prune)
            assert all(v == ids["plain"] for v in ids.values()), (seed, prune, ids)
    bf16 = twigvlm.VLM.from_model(
        copy.deepcopy(gpu.adapter.model).to(torch.bfloat16),
        gpu.adapter.processor,
        copy.deepcopy(gpu.twig).to(torch.bfloat16),
    )
    exact = compared = 0
    for seed in range(4):
        request, ids = seeded_texts(bf16, seed, None)
        for name, ours in ids.items():
            if name == "plain":
                continue
            compared += 1
            if ours == ids["plain"]:
                exact += 1
            else:
                assert first_difference_is_a_perturbed_tie(bf16, request, ours, ids["plain"]), (seed, name)
    assert exact >= 0.75 * compared, f"only {exact}/{compared} bf16 seeded runs gave the plain ids"


def test_the_pruning_head_trains_on_cuda(model_dirs, tmp_path):
    """`twigvlm train --objective pruning` on CUDA (the demo build's last stage): the teacher rows, the training
    and the held-out check run with the model on the GPU (the data set's tensors start on the CPU)."""
    from twigvlm.train.config import TrainConfig
    from twigvlm.train.prune_head import train_prune_head

    from .conftest import write_llava_data

    model = model_dirs["llama-clip"]
    vlm = twigvlm.load(model)
    vlm.grow_twig(K=2, T=2)
    vlm.save_twig(tmp_path / "twig")
    data = write_llava_data(tmp_path / "d", 4)
    cfg = TrainConfig(
        model=model, init=str(tmp_path / "twig"), objective="pruning", data=data, out=str(tmp_path / "out"),
        max_steps=4, batch_size=2, lr=3e-2, device="cuda",
    )  # fmt: skip
    result = train_prune_head(cfg)
    assert result.overlap_after == result.overlap_after  # a number (not NaN)
    trained = twigvlm.load(model, twig=str(tmp_path / "out"), device="cuda")
    assert trained.twig.prune_head is not None
