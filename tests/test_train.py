"""Twig training: the objective against stock HF's own loss, KL ≈ 0 for an exact copy, the base left bit-identical,
exact gradient accumulation, resume ≡ uninterrupted, a 2-process gloo run, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import twigvlm
from twigvlm.cli.main import main
from twigvlm.config import TwigConfig
from twigvlm.train.config import DataConfig, TrainConfig
from twigvlm.train.data import Collator, LlavaDataset, pad_token_id
from twigvlm.train.objective import EVAL_FIELDS, TwigObjective
from twigvlm.train.recipe import train_twig
from twigvlm.twig.model import grow_twig, load_twig

SUM_TOL = 1e-4  # fp32 sums over a few dozen tokens


def _batch(vlm, path: str, idx=(0, 1, 2, 3)):
    ds = LlavaDataset(path, vlm.adapter, DataConfig(data=path))
    return [ds[i] for i in idx], Collator(pad_token_id(vlm.adapter))


def _objective(vlm, cfg: TwigConfig, distill: str = "none") -> TwigObjective:
    return TwigObjective(vlm.adapter, grow_twig(vlm.adapter, cfg), distill=distill)


def test_exact_copy_twig_reproduces_hf_loss_and_zero_kl(vlm, llava_data):
    """A twig with K+T = L and a copied head is the full model: its loss is stock HF's own `labels=` loss."""
    examples, collate = _batch(vlm, llava_data["train"])
    batch = collate(examples)
    L = vlm.adapter.spec.num_layers
    obj = _objective(vlm, TwigConfig(K=2, T=L - 2, head="copy"), distill="kl")
    out = obj(**batch)
    with torch.no_grad():
        hf = vlm.adapter.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]
        ).loss
    assert abs(out["loss"].item() - hf.item()) < 1e-5
    assert abs(obj.last_parts["kl"]) < 1e-5 * obj.last_parts["tokens"]
    sums = obj.eval_sums(**batch).sum(0)
    metrics = dict(zip(EVAL_FIELDS, sums.tolist(), strict=True))
    assert metrics["agree"] == metrics["tokens"] and metrics["twig_correct"] == metrics["base_correct"]


def test_padding_changes_nothing(vlm, llava_data):
    """Right padding without a mask is exact: the batch's loss sum equals the per-example sums."""
    examples, collate = _batch(vlm, llava_data["train"])
    obj = _objective(vlm, TwigConfig(K=2, T=1), distill="kl")
    obj(**collate(examples), num_items_in_batch=1)
    together = dict(obj.last_parts)
    alone = {"ce": 0.0, "kl": 0.0, "tokens": 0}
    for e in examples:
        obj(**collate([e]), num_items_in_batch=1)
        alone = {k: alone[k] + obj.last_parts[k] for k in alone}
    assert together["tokens"] == alone["tokens"] > 0
    assert abs(together["ce"] - alone["ce"]) < SUM_TOL and abs(together["kl"] - alone["kl"]) < SUM_TOL
    assert together["kl"] > 0.01  # a 1-layer twig is not the base


def test_deep_layers_never_run_unless_distilling(vlm, llava_data):
    examples, collate = _batch(vlm, llava_data["train"])
    calls = []
    K = 2
    plain, distilled = _objective(vlm, TwigConfig(K=K, T=2)), _objective(vlm, TwigConfig(K=K, T=2), distill="kl")
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in vlm.adapter.layers[K:]]
    try:
        plain(**collate(examples))["loss"].backward()
        assert calls == []
        assert all(p.grad is not None for p in plain.twig.parameters())
        distilled(**collate(examples))["loss"].backward()
        assert len(calls) == len(vlm.adapter.layers) - K
        assert all(p.grad is None for p in vlm.adapter.model.parameters())
    finally:
        for h in hooks:
            h.remove()


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=data,
        out=str(out),
        max_steps=6,
        lr=1e-3,
        batch_size=4,
        save_steps=3,
        logging_steps=1,
        seed=3,
        warmup_ratio=0.0,
    )
    return TrainConfig(**{**base, **kw})


def _twig_state(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "twig.safetensors"))


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(vlms, model_dirs, llava_data, tmp_path, capsys):
    vlm = vlms["llama-clip"]
    base_before = {k: v.clone() for k, v in vlm.adapter.model.state_dict().items()}
    grown = {k: v.clone() for k, v in grow_twig(vlm.adapter, TwigConfig()).state_dict().items()}
    cfg = _cfg(
        model_dirs["llama-clip"],
        llava_data["train"],
        tmp_path / "twig",
        eval_data=llava_data["eval"],
        max_steps=12,
        save_steps=100,
        eval_steps=6,
    )
    capsys.readouterr()
    evaluations = _Evaluations()
    result = train_twig(cfg, adapter=vlm.adapter, callbacks=[evaluations])
    log = "".join(capsys.readouterr())  # (not a terminal, as a log file)
    assert "step 6: eval_loss" in log and "\x1b[A" not in log  # no nested bar moving the cursor up
    # before, at step 6 and at the last step (the Trainer's own, which is the result's: not run a second time)
    assert [step for step, _ in evaluations.seen] == [0, 6, 12] and result.eval_after == evaluations.seen[-1][1]
    for k, v in vlm.adapter.model.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    assert all(not p.requires_grad for p in vlm.adapter.model.parameters())
    trained = _twig_state(result.out)
    assert all(not torch.equal(trained[k], grown[k]) for k in trained), "every twig tensor trains"
    assert result.steps == 12
    assert result.eval_after["eval_loss"] < result.eval_before["eval_before_loss"] - 0.5
    # The output loads onto the base and drafts losslessly (greedy SSD ≡ greedy AR).
    loaded = twigvlm.load(model_dirs["llama-clip"], twig=result.out)
    image = vlm.adapter.model.device  # noqa: F841 — the base stays where it was
    kwargs = dict(
        prompt="What color is the picture?",
        image=str(Path(llava_data["train"]).parent / "images/0-0.png"),
        max_new_tokens=12,
        ignore_eos=True,
    )
    assert loaded.generate(**kwargs, speculative=True).token_ids == loaded.generate(**kwargs).token_ids


def test_gradient_accumulation_is_exact(vlms, model_dirs, llava_data, tmp_path):
    """Loss = summed CE / answer tokens of the whole accumulated batch: 4×1 and 2×2 take the same steps."""
    vlm = vlms["qwen2-siglip"]
    a = train_twig(
        _cfg(model_dirs["qwen2-siglip"], llava_data["train"], tmp_path / "a", max_steps=3, save_steps=99),
        adapter=vlm.adapter,
    )
    b = train_twig(
        _cfg(
            model_dirs["qwen2-siglip"],
            llava_data["train"],
            tmp_path / "b",
            max_steps=3,
            save_steps=99,
            batch_size=2,
            grad_accum=2,
        ),
        adapter=vlm.adapter,
    )
    _assert_close(_twig_state(a.out), _twig_state(b.out), atol=1e-5)


class _Evaluations(TrainerCallback):
    """Every evaluation's step and metrics, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, metrics))


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_reaches_the_uninterrupted_parameters(vlms, model_dirs, llava_data, tmp_path):
    vlm = vlms["qwen2-siglip"]
    cfg = _cfg(model_dirs["qwen2-siglip"], llava_data["train"], tmp_path / "full")
    full = train_twig(cfg, adapter=vlm.adapter)
    cut = replace(cfg, out=str(tmp_path / "cut"))
    train_twig(cut, adapter=vlm.adapter, callbacks=[_StopAt(3)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    (tmp_path / "cut" / "twig.json").unlink()  # as if the run had been killed before its final save
    # and while writing later checkpoints: no trainer state (5), a state cut short (4); a folder of the user's stays
    for name in ("checkpoint-4", "checkpoint-5", "checkpoint-backup-9"):
        shutil.copytree(tmp_path / "cut" / "checkpoint-3", tmp_path / "cut" / name)
    (tmp_path / "cut" / "checkpoint-5" / "trainer_state.json").unlink()
    state_4 = tmp_path / "cut" / "checkpoint-4" / "trainer_state.json"
    state_4.write_text(state_4.read_text()[:40])
    resumed = train_twig(replace(cut, resume=True), adapter=vlm.adapter)  # from checkpoint-3, not the broken 4, 5
    assert (tmp_path / "cut" / "checkpoint-backup-9").is_dir()
    assert resumed.steps == full.steps == 6
    state = json.loads((tmp_path / "cut" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # Same data order, optimizer and scheduler state: equal up to float rounding of the reloaded moments.
    _assert_close(_twig_state(full.out), _twig_state(resumed.out), atol=1e-6)
    # Every checkpoint is itself a twig directory.
    load_twig(vlm.adapter, tmp_path / "cut" / "checkpoint-3")


def test_two_process_gloo_run_writes_one_twig(model_dirs, llava_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "twigvlm.cli",
        "train",
        "--model",
        model_dirs["llama-clip"],
        "--data",
        llava_data["train"],
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--lr",
        "1e-3",
        "--distill",
        "kl",
        "--eval-data",
        llava_data["eval"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("twig written to") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    twigvlm.load(model_dirs["llama-clip"], twig=out)


def test_cli_train_and_its_errors(model_dirs, llava_data, tmp_path, capsys):
    model, data = model_dirs["qwen2-siglip"], llava_data["train"]
    out = tmp_path / "twig"
    args = [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--save-dtype",
        "bfloat16",
        "--K",
        "1",
        "--T",
        "2",
    ]
    assert main(args) == 0
    assert "twig written to" in capsys.readouterr().out
    assert json.loads((out / "twig.json").read_text())["dtype"] == "bfloat16"
    vocab_out = tmp_path / "vocab"
    assert (
        main(
            [
                "train",
                "--model",
                model,
                "--data",
                data,
                "--out",
                str(vocab_out),
                "--max-steps",
                "1",
                "--draft-vocab",
                "5",
                "--wipe-layer",
                "4",
            ]
        )
        == 0
    )
    twig = twigvlm.load(model, twig=vocab_out).twig
    assert twig.config.wipe_layer == 4
    eos = set(twigvlm.load(model).adapter.eos_token_ids)
    assert eos <= set(twig.draft_vocab.tolist()) and len(twig.draft_vocab) <= 5 + len(eos)
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "killed" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "fake.png").write_text("not a picture")
    unreadable = tmp_path / "unreadable.json"
    unreadable.write_text(json.dumps([{"image": "fake.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}]))  # fmt: skip
    cases = [
        (  # every answer cut away: it would train on nothing
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "x"), "--max-length", "5"],
            "record 0: --max-length 5 leaves none of its answer",
        ),
        (  # found when the first example is read, before the Trainer creates --out
            ["train", "--model", model, "--data", str(unreadable), "--out", str(tmp_path / "x")],
            "record 0: image",
        ),
        (args, "already holds checkpoint-2 from an earlier run: pass --resume"),
        (
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "notes.txt" / "x")],
            "lies inside",
        ),
        (
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "new"), "--resume"],
            "has no checkpoint-N folder",
        ),
        (  # a run killed while writing its first checkpoint
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "killed"), "--resume"],
            f"no checkpoint-N folder in {tmp_path / 'killed'} was finished (trainer_state.json missing)",
        ),
        (
            ["train", "--model", model, "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")],
            "does not exist",
        ),
        (["train", "--model", model, "--data", data, "--out", str(tmp_path / "x"), "--lr", "0"], "--lr 0.0 must be"),
        (["train", "--model", model, "--data", data, "--out", str(tmp_path / "x"), "--K", "9"], "K"),
        (
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "x"), "--wipe-layer", "99"],
            "--wipe-layer 99 is invalid for this model: give a layer from K+1=3 to L=",
        ),
        (
            ["train", "--model", model, "--data", data, "--out", str(tmp_path / "x"), "--init", str(tmp_path)],
            "is not a twig directory",
        ),
    ]
    for argv, why in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "new").exists()
    # Resuming a finished run with a larger budget continues from its last checkpoint.
    assert main(args[:-4] + ["--K", "1", "--T", "2", "--max-steps", "4", "--resume"]) == 0
    assert (out / "checkpoint-4").is_dir()


def test_missing_files_are_named_before_any_model_loads(model_dirs, llava_data, tmp_path, capsys, monkeypatch):
    """A data file, image folder or --init twig that is not there is one line before the base loads (minutes for
    a large one), from `train`, `train --objective pruning` and `distill-data` alike."""
    from twigvlm.train import prune_head, recipe

    for module in (recipe, prune_head, twigvlm.api):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the base loaded first"))
    model, data, x = model_dirs["qwen2-siglip"], llava_data["train"], str(tmp_path / "x")
    cases = [
        (["train", "--data", str(tmp_path / "none.json"), "--out", x], "data file"),
        (["train", "--data", data, "--eval-data", str(tmp_path / "none.json"), "--out", x], "data file"),
        (["train", "--data", data, "--image-folder", str(tmp_path / "none"), "--out", x], "image folder"),
        (["train", "--data", data, "--out", x, "--init", str(tmp_path)], "is not a twig directory"),
        (["train", "--data", data, "--out", x, "--objective", "pruning", "--init", str(tmp_path)], "not a twig dir"),
        (["distill-data", "--data", str(tmp_path / "none.json"), "--out", x + ".json"], "data file"),
        (["distill-data", "--data", data, "--out", x + ".json", "--twig", str(tmp_path)], "not a twig directory"),
    ]
    for argv, why in cases:
        assert main([*argv[:1], "--model", model, *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert not Path(x).exists()


def test_distill_data_answers_with_the_base_greedy_output(vlms, model_dirs, llava_data, tmp_path, capsys):
    records = json.loads(Path(llava_data["eval"]).read_text())[:3]
    records[0]["conversations"] = records[0]["conversations"][:3]  # answered, then unanswered
    records[1]["conversations"] = records[1]["conversations"][:1]  # unanswered
    src = Path(llava_data["eval"]).parent / "questions.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "answers.jsonl"
    argv = [
        "distill-data",
        "--model",
        model_dirs["llama-clip"],
        "--data",
        str(src),
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
    ]
    assert main(argv) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["conversations"]) for r in written] == [4, 2, len(records[2]["conversations"])]
    assert written[0]["conversations"][:3] == records[0]["conversations"]  # existing answers kept
    assert written[2] == records[2]
    vlm = vlms["llama-clip"]
    image = str(src.parent / records[1]["image"])
    expected = vlm.generate(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the picture?"}]}],
        image,
        max_new_tokens=6,
    ).text
    assert written[1]["conversations"][1] == {"from": "gpt", "value": expected}
    so_far = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the picture?"}]},
        {"role": "assistant", "content": records[0]["conversations"][1]["value"]},
        {"role": "user", "content": "Is it red?"},
    ]
    follow_up = vlm.generate(so_far, str(src.parent / records[0]["image"]), max_new_tokens=6).text
    assert written[0]["conversations"][3] == {"from": "gpt", "value": follow_up}
    assert "wrote 3 record(s) with 2 generated answer(s)" in capsys.readouterr().out
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    # The answers train a twig directly.
    ds = LlavaDataset(str(out), vlm.adapter, DataConfig(data=str(out), image_folder=str(src.parent)))
    assert len(ds) == 3 and all((ds[i]["labels"] != -100).any() for i in range(3))


def test_kl_distillation_keeps_the_twig_closer_to_the_base(vlms, model_dirs, llava_data, tmp_path):
    """On a random base the answers are unrelated to what the base predicts: cross-entropy alone pulls the twig
    away from the base, and the KL term holds it closer (higher agreement with the base's greedy tokens)."""
    vlm = vlms["llama-clip"]
    runs = {
        d: train_twig(
            _cfg(
                model_dirs["llama-clip"],
                llava_data["train"],
                tmp_path / d,
                distill=d,
                max_steps=8,
                save_steps=99,
                eval_data=llava_data["eval"],
                distill_weight=4.0,
            ),
            adapter=vlm.adapter,
        )
        for d in ("none", "kl")
    }
    assert runs["kl"].eval_after["eval_agreement"] > runs["none"].eval_after["eval_agreement"] + 0.1


@pytest.mark.parametrize(
    "change,why",
    [
        (dict(warmup_ratio=1.5), "--warmup-ratio"),
        (dict(batch_size=0), "--batch-size 0"),
        (dict(max_steps=0), "--max-steps 0"),
        (dict(epochs=0.0, max_steps=-1), "--epochs"),
        (dict(max_length=1), "--max-length 1"),
        (dict(save_total_limit=0), "--save-total-limit"),
        (dict(wipe_layer=2), "--wipe-layer 2 must come after the twig's layer --K 2"),
    ],
)
def test_train_config_validation(change, why):
    with pytest.raises(twigvlm.TwigVLMError, match=why):
        replace(TrainConfig(model="m", data=__file__, out="o"), **change).validate()  # a file that exists
