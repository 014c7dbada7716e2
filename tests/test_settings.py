"""The one settings path (`config.pruning`, `config.speculation`) that the Python API, the CLI, the server, the
bench and lmms-eval all take: what each input means, and the one-line errors for settings that cannot go together."""

from __future__ import annotations

import pytest

from twigvlm.config import PruneConfig, SettingError, SpecConfig, pruning, speculation


def test_speculative_on_is_auto_and_a_servers_default_is_used_when_not_said():
    assert speculation(True) == SpecConfig(draft="auto") and speculation(False) is None
    assert speculation(None) is None  # not said, and no default
    server = SpecConfig(draft="chain", draft_len=4)
    assert speculation(None, base=server) == server and speculation(True, base=server) == server
    assert speculation(False, base=server) is None  # a request may turn the server's drafting off
    mine = SpecConfig(draft="tree", tree_nodes=8)
    assert speculation(mine) == mine  # a config built by hand is taken as it is


def test_drafter_settings_go_over_the_defaults_and_raise_the_cap():
    spec = speculation(True, draft="chain", draft_len=12, threshold=0.0)
    assert (spec.draft, spec.draft_len, spec.max_draft_len, spec.threshold) == ("chain", 12, 12, 0.0)
    assert speculation(True, draft="chain", draft_len=3).max_draft_len == SpecConfig.max_draft_len  # it only grows
    assert speculation(True, draft_len=3).max_draft_len == 3  # auto's chains: γ bounds them


@pytest.mark.parametrize(
    "call,param,words",
    [
        (lambda: speculation(False, draft_len=3), "draft_len", "draft_len needs speculative true"),
        (lambda: speculation(None, draft="tree", where="flags"), "draft", "--draft needs --speculative"),
        (lambda: speculation(True, draft="bush"), "draft", "draft='bush' is unknown"),
        (lambda: speculation(True, tree_nodes=0, draft="tree"), "speculative", "tree_nodes=0 is invalid"),
        (lambda: speculation(True, draft_len=257), "draft_len", "draft_len=257 is invalid"),
        (
            lambda: speculation(True, draft="tree", draft_len=4),
            "draft_len",
            "draft_len does nothing for the tree drafter",
        ),
        (
            lambda: speculation(True, draft="chain", tree_nodes=4, tree_depth=2, where="flags"),
            "tree_nodes",
            "--tree-nodes, --tree-depth do nothing for the chain drafter (it takes --draft-len, --draft-threshold",
        ),
        (lambda: pruning("none", keep=8, wipe_layer=5), "keep", "keep, wipe_layer need prune"),
        (lambda: pruning(None, keep_ratio=0.5, where="flags"), "keep_ratio", "--keep-ratio needs --prune"),
        (lambda: pruning(base=PruneConfig(keep=8)), "keep", "keep needs prune"),
        (lambda: pruning("magic"), "prune", "prune method 'magic' is unknown"),
    ],
)
def test_settings_that_cannot_go_together_are_one_line_naming_the_setting(call, param, words):
    with pytest.raises(SettingError) as e:
        call()
    assert e.value.param == param and words in str(e.value) and "\n" not in str(e.value)


def test_a_requests_pruning_goes_over_the_servers():
    server = PruneConfig("fastv", keep_ratio=0.5, wipe_layer=5)
    assert pruning(None, base=server) == server
    assert pruning(None, keep=8, base=server) == PruneConfig("fastv", keep=8, wipe_layer=5)  # one budget for another
    assert pruning("twig", base=server).method == "twig"
    assert pruning("none", base=server) is None  # turning pruning off drops the server's budget, no error
    assert pruning("visionzip") == PruneConfig("visionzip") and pruning() is None
    with pytest.raises(TypeError):
        speculation(True, keep=3)  # a pruning setting is no drafting setting


def test_speculative_takes_a_switch_or_a_config_not_a_name():
    with pytest.raises(SettingError, match="draft=") as e:
        speculation("chain")  # a drafter by name is draft="chain", not speculative="chain"
    assert e.value.param == "speculative"


def test_a_temperature_too_small_to_divide_by_decodes_greedily():
    """Below GREEDY_BELOW (vLLM's rule), a temperature is greedy decoding: logits divided by 1e-37 overflow float32
    (softmax's NaN would fail a whole batch's step)."""
    from twigvlm.config import GREEDY_BELOW, GenConfig

    assert not GenConfig(temperature=1e-37).do_sample and not GenConfig(temperature=GREEDY_BELOW / 2).do_sample
    assert GenConfig(temperature=GREEDY_BELOW).do_sample and GenConfig(temperature=0.7).do_sample
