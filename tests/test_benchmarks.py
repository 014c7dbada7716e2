"""Native benchmark files and scoring: each benchmark's tiny hand-made sample in its exact published format loads
and scores to hand-computed values (POPE's yes/no parsing, TextVQA's partial credit, MME's accuracy+, MMBench's
circular rotation, ...); malformed files are one line naming the file and the record."""

from __future__ import annotations

import pytest

from twigvlm.bench.benchmarks import benchmark_metrics, load_benchmark
from twigvlm.bench.benchmarks.normalize import (
    choice_letter,
    mme_yes_no,
    pope_yes_no,
    sqa_letter,
    vqa_accuracy,
    vqa_normalize,
)
from twigvlm.bench.benchmarks.vqa import vqav2_score
from twigvlm.bench.report import paper_table
from twigvlm.errors import TwigVLMError

from . import benchmark_files as bf


def _load(name, files, **kwargs):
    return load_benchmark(name, [str(files["questions"]), str(files["images"]), str(files["answers"])], **kwargs)


def _scores(samples, predictions):
    return [s.score(p) for s, p in zip(samples, predictions, strict=True)]


# ---- the parsers and normalizers, against the official scripts' behaviour --------------------------------------
@pytest.mark.parametrize(
    "text,parsed",
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("Yes, there is a dog. It is not small.", "yes"),  # only the first sentence counts
        ("There is no dog", "no"),
        ("I do not see one", "no"),
        ("Nope", "yes"),  # the official rule looks for the words No / no / not only
        ("NO", "yes"),
    ],
)
def test_pope_yes_no_follows_llavas_eval_pope(text, parsed):
    assert pope_yes_no(text) == parsed


@pytest.mark.parametrize(
    "text,normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("Coca-Cola", "coca cola"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("none", "0"),
        ("(Yes)", "yes"),
        ("It's red!", "it 's red"),
    ],
)
def test_vqa_normalization(text, normalized):
    assert vqa_normalize(text) == normalized


@pytest.mark.parametrize(
    "prediction,expected",
    [
        ("Coca-Cola", 0.6),  # 2 of 10 humans: (2 × 1/3 + 8 × 2/3) / 10
        ("coke", 1.0),  # 7 of 10: at least 3 in every 9-subset
        ("Pepsi.", 0.3),  # 1 of 10: 9 × 1/3 / 10
        ("sprite", 0.0),
    ],
)
def test_textvqa_partial_credit(prediction, expected):
    answers = [vqa_normalize(a) for a in ["coca cola"] * 2 + ["coke"] * 7 + ["pepsi"]]
    assert vqa_accuracy(vqa_normalize(prediction), answers) == pytest.approx(expected)
    # three of ten: 3 subsets lose one of them (2/3), 7 keep all three (1)
    assert vqa_accuracy("red", ["red"] * 3 + ["orange"] * 7) == pytest.approx(0.9)


def test_vqav2_score_as_vqaeval():
    assert vqav2_score("two", ["2"] * 10) == 1.0  # number words become digits
    assert vqav2_score("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqav2_score("no", ["yes"] * 9 + ["no"]) == pytest.approx(0.3)
    # humans disagree, so their answers lose articles too: "an umbrella" counts as "umbrella" (6 of 10)
    assert vqav2_score("umbrella", ["umbrella"] * 4 + ["an umbrella"] * 2 + ["stick"] * 4) == 1.0


@pytest.mark.parametrize(
    "text,parsed",
    [("Yes", "yes"), ("No, it is not", "no"), ("yes.", "yes"), ("Nope", "no"), ("There is one", "other")],
)
def test_mme_yes_no_follows_calculation_py(text, parsed):
    assert mme_yes_no(text) == parsed


@pytest.mark.parametrize(
    "text,n,letter",
    [
        ("B", 3, "B"),
        ("B. whale", 3, "B"),
        ("The answer is C.", 3, "C"),
        ("C", 2, None),  # no third choice
        ("I think B", 3, None),
        ("The answer is A. The answer is B.", 3, None),  # two answers: failed
    ],
)
def test_scienceqa_letter_follows_eval_science_qa(text, n, letter):
    assert sqa_letter(text, n) == letter


@pytest.mark.parametrize(
    "text,letter",
    [("B", "B"), ("(C) bird", "C"), ("The answer is D", "D"), ("dog", "B"), ("a dog or a cat", None)],
)
def test_mmbench_choice_letter(text, letter):
    assert choice_letter(text, ["cat", "dog", "bird", "fish"]) == letter


# ---- each benchmark's files, loaded and scored -----------------------------------------------------------------
def test_pope_per_category_and_overall(tmp_path):
    files = bf.pope(tmp_path)
    samples = _load("pope", files)
    assert [s.meta["category"] for s in samples] == ["adversarial"] * 4 + ["random"] * 2
    assert samples[0].prompt.startswith("Is there a dog in the image?\n") and samples[0].image().size == (48, 40)
    # labels: yes yes no no | yes no
    preds = ["Yes.", "No, there is not.", "Yes, there is.", "no", "Yes", "No"]
    assert _scores(samples, preds) == [1, 0, 0, 1, 1, 1]
    m = benchmark_metrics(samples, preds)
    adv = m["categories"]["adversarial"]  # TP 1, FN 1, FP 1, TN 1
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"], adv["yes_ratio"]) == (0.5,) * 5
    assert m["categories"]["random"]["f1"] == 1.0 and m["categories"]["random"]["yes_ratio"] == 0.5
    assert m["f1"] == pytest.approx(0.75)  # mean over the categories
    overall = m["overall"]  # TP 2, FN 1, FP 1, TN 2
    assert overall["accuracy"] == pytest.approx(4 / 6) and overall["f1"] == pytest.approx(2 / 3)
    # one annotation file: only its category
    one = _load("pope", {**files, "answers": files["answers"] / "coco_pope_random.json"})
    assert [s.id for s in one] == ["5", "6"]
    assert len(_load("pope", files, limit=3)) == 3


def test_gqa_exact_match_after_llavas_conversion(tmp_path):
    files = bf.gqa(tmp_path)
    samples = _load("gqa", files)
    preds = ["Yes.", "the left", "Table"]  # GQA keeps articles: "the left" is wrong
    assert _scores(samples, preds) == [1, 0, 1]
    m = benchmark_metrics(samples, preds)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["structural"] == {"verify": 1.0, "query": 0.5}
    # GQA's own question file as the questions: the same samples, LLaVA's prompt
    own = _load("gqa", {**files, "questions": files["answers"]})
    assert [(s.id, s.prompt) for s in own] == [(s.id, s.prompt) for s in samples]


def test_textvqa_matches_questions_through_the_ocr_prompt(tmp_path):
    files = bf.textvqa(tmp_path)
    samples = _load("textvqa", files)
    assert "Reference OCR token: Coca, Cola" in samples[0].prompt
    m = benchmark_metrics(samples, ["Coca-Cola", "red"])
    assert m["accuracy"] == pytest.approx((0.6 + 0.9) / 2)
    own = _load("textvqa", {**files, "questions": files["answers"]})  # the annotation file as the questions
    assert own[0].prompt == "What brand is the drink?" + bf.SHORT and own[0].answers == samples[0].answers


def test_vqav2_from_the_official_question_and_annotation_files(tmp_path):
    files = bf.vqav2(tmp_path)
    samples = _load("vqav2", files)
    assert samples[0].prompt == "How many dogs?" + bf.SHORT and samples[0].image().size == (48, 40)
    m = benchmark_metrics(samples, ["two", "no", "stick"])
    # stick: 4 of 10 humans → 1.0; "no": 0.3
    assert m["accuracy"] == pytest.approx((1.0 + 0.3 + 1.0) / 3)
    assert m["answer_types"] == {"number": 1.0, "yes/no": pytest.approx(0.3), "other": 1.0}


def test_scienceqa_img_subset_and_letter(tmp_path):
    files = bf.scienceqa(tmp_path)
    samples = _load("scienceqa", files)
    assert [s.id for s in samples] == ["4", "7"]  # problem 9 has no image: not in SQA-IMG
    assert "<image>" not in samples[0].prompt and samples[0].prompt.endswith("choices directly.")
    m = benchmark_metrics(samples, ["B", "The answer is B."])  # right, wrong
    assert m["accuracy"] == 0.5 and m["subjects"] == {"natural science": 1.0, "social science": 0.0}


def test_mme_accuracy_plus_and_score(tmp_path):
    folder = bf.mme(tmp_path)
    samples = load_benchmark("mme", [str(folder)])
    order = [(s.meta["category"], s.answers[0]) for s in samples]
    preds = {  # per category, in file order: existence image 1 both right, image 2 one right; ...
        "artwork": ["No", "No"],
        "code_reasoning": ["yes.", "no"],
        "existence": ["Yes", "No", "Yes", "Yes"],
    }
    it = {c: iter(p) for c, p in preds.items()}
    predictions = [next(it[c]) for c, _ in order]
    m = benchmark_metrics(samples, predictions)
    assert m["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
    assert m["categories"]["artwork"]["score"] == 50.0 and m["categories"]["code_reasoning"]["score"] == 200.0
    assert (m["perception"], m["cognition"], m["score"]) == (175.0, 200.0, 375.0)
    # LLaVA's llava_mme.jsonl as the questions: the same answers, its own prompts
    jsonl = load_benchmark("mme", [str(bf.mme_llava_jsonl(tmp_path, folder)), str(folder), str(folder)])
    assert sorted(s.answers[0] for s in jsonl) == sorted(s.answers[0] for s in samples) and len(jsonl) == 8
    assert len(load_benchmark("mme", [str(folder)], limit=3)) == 4  # whole images only


def test_mmbench_circular_rotation(tmp_path):
    tsv = bf.mmbench(tmp_path)
    single = load_benchmark("mmbench", [str(tsv)])
    assert len(single) == 2 and single[1].prompt.startswith("Look at the sky.\nIs the scene outdoors?\nA. yes\nB. no\n")
    circular = load_benchmark("mmbench", [str(tsv)], circular=True)
    assert [s.answers[0] for s in circular] == ["B", "A", "D", "C", "A", "B"]  # "dog" moves up one place a round
    assert "\nA. dog\nB. bird\nC. fish\nD. cat\n" in circular[1].prompt
    assert benchmark_metrics(single, ["B", "A"])["accuracy"] == 1.0
    m = benchmark_metrics(circular, ["B", "A", "D", "C", "A", "A"])  # the 2-option question fails its rotation
    assert m["accuracy"] == 0.5 and m["circular"] and m["categories"] == {"object_localization": 1.0, "scene": 0.0}


def test_mmbench_tsv_with_its_own_circular_copies(tmp_path):
    base = {"question": "q?", "hint": "nan", "C": "nan", "D": "nan", "category": "c"}
    rows = [
        {**base, "index": 5, "A": "x", "B": "y", "answer": "A"},
        {**base, "index": 1000005, "A": "y", "B": "x", "answer": "B"},
    ]
    tsv = bf.mmbench(tmp_path, rows)
    assert len(load_benchmark("mmbench", [str(tsv)])) == 1  # the copy only with --circular
    both = load_benchmark("mmbench", [str(tsv)], circular=True)
    assert [s.answers[0] for s in both] == ["A", "B"]
    assert (
        benchmark_metrics(both, ["A", "A"])["accuracy"] == 0.0 and benchmark_metrics(both, ["A", "B"])["questions"] == 1
    )


# ---- malformed files: one line naming the file and the record ---------------------------------------------------
def test_malformed_native_files_name_file_and_record(tmp_path):
    files = bf.pope(tmp_path / "pope")
    bad = files["answers"] / "coco_pope_random.json"
    bad.write_text(bad.read_text().replace('"label": "no"', '"label": "maybe"'))
    with pytest.raises(TwigVLMError, match=r"coco_pope_random.json line 2: 'label' is 'maybe': it must be yes or no"):
        _load("pope", files)
    gqa = bf.gqa(tmp_path / "gqa")
    gqa["questions"].write_text(
        gqa["questions"].read_text() + '{"question_id": "999", "image": "n1.jpg", "text": "q"}\n'
    )
    with pytest.raises(TwigVLMError, match=r"llava_gqa_testdev_balanced.jsonl line 4: question 999 has no answer"):
        _load("gqa", gqa)
    sqa = bf.scienceqa(tmp_path / "sqa")
    sqa["answers"].write_text(sqa["answers"].read_text().replace('"answer": 1', '"answer": 7', 1))
    with pytest.raises(TwigVLMError, match=r"problems.json problem 4: 'answer' must be the index of a choice"):
        _load("scienceqa", sqa)
    mme = bf.mme(tmp_path / "mme")
    (mme / "existence" / "1.txt").write_text("Is there a dog?\tMaybe\n")
    with pytest.raises(TwigVLMError, match=r"1.txt line 1: needs 'question<TAB>Yes\|No'"):
        load_benchmark("mme", [str(mme)])
    (tmp_path / "mmb").mkdir()
    tsv = bf.mmbench(tmp_path / "mmb")
    tsv.write_text(tsv.read_text().replace("\tB\tobject_localization", "\tE\tobject_localization"))
    with pytest.raises(TwigVLMError, match=r"mmbench_dev_20230712.tsv line 2: needs options A, B, \.\.\. and 'answer'"):
        load_benchmark("mmbench", [str(tsv)])
    tvqa = bf.textvqa(tmp_path / "tvqa")
    tvqa["answers"].write_text(tvqa["answers"].read_text().replace('"answers": ["red"', '"answers": [3, "red"'))
    with pytest.raises(TwigVLMError, match=r"TextVQA_0.5.1_val.json data\[1\]: needs 'answers'"):
        _load("textvqa", tvqa)
    vqa = bf.vqav2(tmp_path / "vqa")
    vqa["answers"].write_text(vqa["answers"].read_text().replace('"question_id": 13', '"question_id": 14'))
    with pytest.raises(TwigVLMError, match=r"q.json questions\[2\]: question 13 has no annotation in .*a.json"):
        _load("vqav2", vqa)
    with pytest.raises(TwigVLMError, match="write pope=QUESTIONS,IMAGE_FOLDER,ANSWERS$"):
        load_benchmark("pope", [str(files["questions"])])


# ---- the paper's table -----------------------------------------------------------------------------------------
def test_paper_table_layout_and_relacc():
    summary = {
        "hf": {"accuracy": {"m": 1500.0, "p": 0.8, "x": 0.5}},
        "twig": {"accuracy": {"m": 1200.0, "p": 0.76, "x": 0.1}},
    }
    table = paper_table(summary, {"m": "mme", "p": "pope"}).splitlines()  # x: not a benchmark, not a column
    assert table[0] == "| method | POPE | MME | RelAcc |"
    assert table[2] == "| hf | 80.0 | 1500.0 | 100.0% |"
    assert table[3] == "| twig | 76.0 | 1200.0 | 87.5% |"  # mean(0.95, 0.80)


# ---- end to end: `twigvlm bench` on native files ---------------------------------------------------------------
def test_bench_on_native_files_prints_the_paper_table(model_dirs, tmp_path, capsys):
    import json

    from twigvlm.bench.benchmarks import pope
    from twigvlm.cli.main import main

    files = bf.pope(tmp_path / "pope")
    tsv = bf.mmbench(tmp_path)
    out = tmp_path / "out"
    spec = f"pope={files['questions']},{files['images']},{files['answers']};mme={bf.mme(tmp_path)};mmbench={tsv}"
    argv = ["bench", "--model", model_dirs["llama-clip"], "--methods", "hf,ar", "--tasks", spec, "--circular"]
    assert main(argv + ["--limit", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | POPE | MME | MMB | RelAcc |" in printed
    results = json.loads((out / "results.json").read_text())
    own = results["summary"]["ar"]["benchmarks"]
    assert set(own) == {"pope", "mme", "mmbench"} and own["mmbench"]["circular"] and own["mmbench"]["questions"] == 2
    # the reported POPE metrics are POPE's own, recomputed here from the predictions in samples.jsonl
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    texts = {r["sample"]: r["text"] for r in rows if r["variant"] == "ar" and r["task"] == "pope"}
    samples = _load("pope", files, limit=2)
    assert own["pope"] == pope.metrics(samples, [texts[s.id] for s in samples])
    assert results["summary"]["ar"]["accuracy"]["pope"] == own["pope"]["f1"]
    assert results["summary"]["ar"]["accuracy"]["mme"] == own["mme"]["score"]


def test_bench_native_file_errors_exit_2_and_write_nothing(model_dirs, tmp_path, capsys):
    from twigvlm.cli.main import main

    files = bf.gqa(tmp_path)
    files["answers"].write_text('{"201": {"question": "q"}}')
    out = tmp_path / "out"
    spec = f"gqa={files['questions']},{files['images']},{files['answers']}"
    assert main(["bench", "--model", model_dirs["llama-clip"], "--tasks", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "testdev_balanced_questions.json question 201: needs 'answer' (text)" in err and err.count("\n") == 1
    assert not out.exists()
