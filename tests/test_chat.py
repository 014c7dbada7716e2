"""`twigvlm chat`: multi-turn with /image, streamed answers equal to the API's on the same conversation, a stats
line per turn, and one-line errors that leave the chat running."""

from __future__ import annotations

import io

from tests.conftest import random_image
from twigvlm import GenConfig, PruneConfig, SpecConfig
from twigvlm.cli import main as cli
from twigvlm.cli.chat import run_chat


def scripted(lines: list[str]):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_a_two_turn_chat_with_an_image_is_the_api_on_the_whole_conversation(vlms, tmp_path):
    vlm = vlms["qwen2-siglip"]
    vlm.twig = None
    vlm.grow_twig(K=2, T=2)
    path = tmp_path / "a.png"
    random_image(3).save(path)
    out = io.StringIO()
    config = GenConfig(max_new_tokens=6, temperature=0)
    lines = ["/image " + str(tmp_path / "missing.png"), "/image " + str(path), "What is it?", "/what", "", "And?"]
    chat = run_chat(vlm, scripted(lines), out, config, PruneConfig("twig", keep=8), SpecConfig(draft_len=2))
    text = out.getvalue()
    assert "error: image" in text and "does not exist" in text  # a bad path: one line, the chat goes on
    assert text.count("assistant> ") == 2 and "commands:" in text
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    a1 = vlm.generate(first, image=[chat.images[0]], config=config, prune=PruneConfig("twig", keep=8))
    second = [*first, {"role": "assistant", "content": [{"type": "text", "text": a1.text}]},
              {"role": "user", "content": [{"type": "text", "text": "And?"}]}]  # fmt: skip
    a2 = vlm.generate(second, image=[chat.images[0]], config=config, prune=PruneConfig("twig", keep=8))
    assert chat.messages == [*second, {"role": "assistant", "content": [{"type": "text", "text": a2.text}]}]
    assert f"assistant> {a1.text}\n[" in text and f"assistant> {a2.text}\n[" in text  # SSD: the same text
    stats = [line for line in text.splitlines() if line.startswith("[")]
    assert len(stats) == 2 and f"kept {a1.stats.kept}/{a1.stats.visual_tokens} visual tokens" in stats[0]
    assert f"kept {a2.stats.kept}/{a2.stats.visual_tokens} visual tokens" in stats[1]
    assert all("acceptance" in s and "tokens/s" in s for s in stats)
    vlm.twig = None


def test_the_chat_command_reads_stdin_and_reset_forgets(model_dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nhi\n/quit\nnever read\n"))
    assert cli.main(["chat", "--model", model_dirs["llama-clip"], "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if "assistant> " in line]
    assert len(answers) == 2 and answers[0] == answers[1]  # after /reset the same first turn again
    assert "[3 tokens" in out and "starts over" in out


def test_chat_flags_are_checked_before_loading(capsys):
    assert cli.main(["chat", "--model", "/nonexistent", "--twig", "none", "--speculative"]) == 2
    err = capsys.readouterr().err
    assert "twig" in err and err.count("\n") == 1
    assert cli.main(["chat", "--model", "/nonexistent", "--keep", "8"]) == 2
    assert "--keep needs --prune" in capsys.readouterr().err


def test_a_turn_that_fails_drops_its_pictures_and_the_chat_goes_on(vlms, tmp_path):
    """Two pictures push M past what --keep allows: that turn fails in one line, its pictures are not kept, and
    the next message (text only) is answered, not refused again."""
    vlm = vlms["llama-clip"]
    for name in ("a.png", "b.png"):
        random_image(4).save(tmp_path / name)
    out = io.StringIO()
    lines = ["/image " + str(tmp_path / "a.png"), "/image " + str(tmp_path / "b.png"), "both?", "and now?"]
    chat = run_chat(vlm, scripted(lines), out, GenConfig(max_new_tokens=3), PruneConfig("fastv", keep=8))
    text = out.getvalue()
    assert "is infeasible" in text and "the 2 picture(s) attached to it are dropped); /reset" in text
    assert text.count("error:") == 1 and text.count("assistant> ") == 1  # refused before its answer began
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and chat.images == [] and chat.pending == []
