"""Answer normalization and parsing as the benchmarks' own scoring scripts do it.

- `vqa_normalize`: the VQA / TextVQA answer processor (EvalAI's, used by VQAv2's `vqaEval.py` and TextVQA's
  `m4c_evaluator.py`): lower case, commas and `?` dropped, punctuation removed or spaced, periods not followed by a
  digit removed, number words as digits (`none` → 0), articles dropped, missing apostrophes of contractions restored.
- `vqa_accuracy`: min(#humans who gave the answer / 3, 1), averaged over the 10-choose-9 subsets of the answers.
- `pope_yes_no`: LLaVA's `eval_pope.py` — the first sentence, commas dropped, "no" if the words hold `No`, `no` or
  `not`, else "yes".
- `mme_yes_no`: MME's `calculation.py` — "yes"/"no" as is, else whichever of them the first four characters hold.
- `sqa_letter`: LLaVA's `eval_science_qa.py` — a bare letter, "X. …", or one "The answer is X.".
"""

from __future__ import annotations

import re

# The official contractions table (vqaEval.py, EvalAI's processor) as written=restored. Its capitalised keys ("Im",
# "Ive", "Id've") never match the lower-cased text there, so they are left out here too.
_CONTRACTIONS = dict(
    pair.split("=", 1)
    for pair in (
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
        "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
        "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
        "howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am "
        "mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't "
        "mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at "
        "'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've shouldve=should've "
        "shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd "
        "somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's "
        "someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll "
        "someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've "
        "somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've "
        "therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll "
        "theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've "
        "werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
        "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's "
        "whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't "
        "wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
        "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've "
        "you'dve=you'd've youll=you'll youre=you're youve=you've "
    ).split()
)
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (the official pattern's effect)
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def _punctuation(text: str) -> str:
    """Each mark removed where it touches a space (or when the text has a digit comma), else made a space."""
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_clean(answer: str) -> str:
    """`vqaEval.py`'s processing of one answer: punctuation, then digits, articles and contractions."""
    return _digits_articles(_punctuation(answer))


def vqa_normalize(answer: str) -> str:
    """EvalAI's answer processor (TextVQA's evaluator; LLaVA's VQAv2 submission): the full normalization."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_clean(text.replace("\n", " ").replace("\t", " ").strip())


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#matching humans / 3, 1), averaged over leaving each of the human answers out (all already normalized)."""
    scores = []
    for i in range(len(answers)):
        matching = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)


def pope_yes_no(text: str) -> str:
    """LLaVA's `eval_pope.py` parsing of a POPE answer."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(text: str) -> str:
    """MME's `calculation.py` parsing: "yes", "no" or "other"."""
    answer = text.lower().strip()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def sqa_letter(text: str, num_choices: int) -> str | None:
    """The option letter of a ScienceQA prediction, or None (counted wrong), as `eval_science_qa.py`."""
    letters = "ABCDE"[:num_choices]
    text = text.strip()
    if text in letters and text:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 and found[0] in letters else None


_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")


def choice_letter(text: str, options: list[str]) -> str | None:
    """The option letter of a multiple-choice prediction, or None: a leading letter ("B", "B.", "(B) cat"), else the
    one option letter standing alone in the text, else the one option whose text the answer is."""
    letters = "ABCDEFGHIJ"[: len(options)]
    text = text.strip()
    lead = _LEADING_LETTER.match(text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    alone = {w for w in re.findall(r"\b[A-Z]\b", text) if w in letters}
    if len(alone) == 1:
        return alone.pop()
    said = vqa_normalize(text)
    same = [letters[i] for i, option in enumerate(options) if vqa_normalize(option) == said]
    return same[0] if len(same) == 1 else None
