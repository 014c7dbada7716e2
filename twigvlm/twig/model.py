"""The twig: T decoder layers grown after base layer K, with a norm and a head — grow, save, load.

Growing copies base layers K+1..K+T (1-based) into new layers (or, for the paper's initialisation ablation, the
last T base layers or fresh random weights), the base final norm into the twig norm, and the LM head into a twig
head ("copy") or reuses the frozen base head ("shared"). Every base parameter is frozen.
Saving writes only the twig (`twig.safetensors` + `twig.json` with a fingerprint of the base); loading onto a
base with another fingerprint is refused with a message naming the mismatch. A twig saved with a file-size limit
(`shard_bytes`, e.g. the demo's 16 MiB) spreads its tensors over `twig.safetensors`, `twig-2.safetensors`, …, which
twig.json lists under "shards".
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.base import VLMAdapter
from ..config import HEAD_MODES, LAYER_INITS, TwigConfig
from ..errors import TwigVLMError
from .fingerprint import ARCH_KEYS, base_fingerprint, check_fingerprint, same_weights
from .prune_head import PruneHead

WEIGHTS_NAME = "twig.safetensors"
CONFIG_NAME = "twig.json"
FORMAT = "twigvlm-twig"
FORMAT_VERSION = 1
SHARD = re.compile(r"twig(-[1-9][0-9]*)?\.safetensors")  # the file names a twig's "shards" may list
HEADER_ROOM = 1 << 16  # bytes kept free in each shard for its safetensors header


class Twig(nn.Module):
    """T decoder layers + norm (+ head, unless shared with the base). Layer i is a stock HF decoder layer.

    draft_vocab (optional buffer, sorted token ids [Vd]): drafting scores only these tokens, a much cheaper head
    than the full vocabulary; the full model still verifies every token, so output stays exact.
    """

    def __init__(
        self,
        config: TwigConfig,
        layers: nn.ModuleList,
        norm: nn.Module,
        head: nn.Module | None,
        base_fingerprint: dict[str, Any],
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self.norm = norm
        self.head = head
        self.base_fingerprint = base_fingerprint
        self.prune_head: PruneHead | None = None  # TwigVLM++'s pruning head, once added (`add_prune_head`)
        self.register_buffer("draft_vocab", None, persistent=True)

    def add_prune_head(self, width: tuple[int, int]) -> PruneHead:
        """Give the twig a fresh pruning head with gates of `width` (the adapter's `query_width`), at torch's
        default initialisation, and return it."""
        ref = next(self.layers[-1].parameters())
        self.prune_head = PruneHead(*width).to(ref.device, ref.dtype)
        return self.prune_head

    def set_draft_vocab(self, token_ids: Any | None) -> None:
        """Restrict drafting to these token ids (None: the whole vocabulary)."""
        if token_ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted, distinct
        if ids.numel() == 0:
            raise TwigVLMError("a draft vocabulary needs at least one token id")
        self.draft_vocab = ids.to(next(self.parameters()).device)

    def extra_repr(self) -> str:
        vocab = "" if self.draft_vocab is None else f", draft_vocab={self.draft_vocab.numel()}"
        pruning = ", prune_head" if self.prune_head is not None else ""
        return f"K={self.config.K}, T={self.config.T}, head={self.config.head}{vocab}{pruning}"


def freeze_base(adapter: VLMAdapter) -> None:
    """No base parameter takes gradients (twig parameters live in their own module)."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)


def _reinitialize(layers: nn.ModuleList, adapter: VLMAdapter) -> None:
    """Fresh weights, as a new model would start: matrices ~ N(0, initializer_range²), biases 0, norm scales 1
    (torch's global generator: seed it for a reproducible twig)."""
    std = float(getattr(adapter.model.config.get_text_config(), "initializer_range", 0.02))
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def grow_twig(adapter: VLMAdapter, config: TwigConfig | None = None) -> Twig:
    """A new twig: layers as `config.layer_init` says (default base layers K+1..K+T), the base final norm and
    (for "copy") the LM head."""
    spec = adapter.spec
    config = config or TwigConfig()
    config.validate(spec.num_layers)
    config = config.resolved(spec.tied_embeddings)
    first = spec.num_layers - config.T if config.layer_init == "last" else config.K
    layers = nn.ModuleList(copy.deepcopy(adapter.layers[first + t]) for t in range(config.T))  # 0-based
    if config.layer_init == "random":
        _reinitialize(layers, adapter)
    norm = copy.deepcopy(adapter.final_norm)
    head = copy.deepcopy(adapter.lm_head) if config.head == "copy" else None
    freeze_base(adapter)
    twig = Twig(config, layers, norm, head, base_fingerprint(adapter)).train(False)
    twig.requires_grad_(True)
    return twig


def _shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    """The tensors in name order, cut into files of at most `limit` bytes each (one tensor larger than that
    alone in its file); one file without a limit."""
    if limit is None:
        return [tensors]
    room = max(1, limit - HEADER_ROOM)
    groups: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name in sorted(tensors):
        size = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and used + size > room:
            groups.append({})
            used = 0
        groups[-1][name] = tensors[name]
        used += size
    return groups


def shard_names(n: int) -> list[str]:
    """The file names of a twig saved in n files."""
    return [WEIGHTS_NAME] + [f"twig-{i}.safetensors" for i in range(2, n + 1)]


def save_twig(
    twig: Twig,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Write twig.safetensors (twig tensors only) and twig.json (config, dtype, base fingerprint).

    dtype: cast the saved tensors (default: the twig's own dtype). tensors: the state dict to write instead of
    the twig's own (a gathered copy, when training sharded it). shard_bytes: no file larger than this (the tensors
    spread over twig.safetensors, twig-2.safetensors, …). Every file is written to a temporary name first and
    renamed at the end, so a failure leaves nothing.
    """
    state = twig.state_dict() if tensors is None else tensors
    dtype = dtype or next(iter(state.values())).dtype
    tensors = {
        name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in state.items()
    }
    dtype = str(dtype).removeprefix("torch.")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "K": twig.config.K,
        "T": twig.config.T,
        "head": twig.config.head,
        "layer_init": twig.config.layer_init,
        "wipe_layer": twig.config.wipe_layer,
        "dtype": dtype,
        "base": twig.base_fingerprint,
        "draft_vocab": int(tensors["draft_vocab"].numel()) if "draft_vocab" in tensors else None,
        "prune_head": any(name.startswith("prune_head.") for name in tensors),
    }
    return _write_twig(Path(out_dir), tensors, meta, shard_bytes)


def _write_twig(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], shard_bytes: int | None) -> Path:
    """Write a twig's files (its tensors in one file or in shards, and twig.json) atomically; remove shards an
    earlier save left that this one does not list."""
    if out.exists() and not out.is_dir():
        raise TwigVLMError(f"{out} exists and is not a directory: choose another output directory")
    groups = _shards(tensors, shard_bytes)
    names = shard_names(len(groups))
    meta = {k: v for k, v in meta.items() if k != "shards"}
    if len(groups) > 1:
        meta["shards"] = names
    created = not out.exists()
    temps: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (*names, CONFIG_NAME):
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
            os.close(fd)
            temps.append(Path(tmp))
        for group, tmp in zip(groups, temps, strict=False):
            save_file(group, str(tmp), metadata={"format": "pt"})
        temps[-1].write_text(json.dumps(meta, indent=2) + "\n")
        for tmp, name in zip(temps, (*names, CONFIG_NAME), strict=True):
            os.replace(tmp, out / name)
        for stale in out.glob("twig-*.safetensors"):
            if stale.name not in names and SHARD.fullmatch(stale.name):
                stale.unlink()
    except OSError as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise TwigVLMError(f"cannot write the twig to {out} ({e.strerror or e}): choose a writable directory") from None
    return out


def _bad_config(cfg_file: Path, why: str) -> TwigVLMError:
    return TwigVLMError(f"{cfg_file} is not a valid twig config: {why}; grow or train the twig again")


def read_twig_config(twig_dir: str | Path) -> dict[str, Any]:
    """twig.json of a twig directory, checked for format and field types."""
    d = Path(twig_dir)
    cfg_file, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir() or not cfg_file.is_file() or not weights.is_file():
        raise TwigVLMError(
            f"{d} is not a twig directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(made by `twigvlm grow` or `twigvlm train`)"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_config(cfg_file, f"not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _bad_config(cfg_file, "a JSON object is expected")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise _bad_config(
            cfg_file,
            f"format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}",
        )
    for key in ("K", "T"):
        if type(meta.get(key)) is not int:
            raise _bad_config(cfg_file, f"{key} must be an integer, got {meta.get(key)!r}")
    meta.setdefault("layer_init", "next")  # twigs saved before the option existed
    if meta["layer_init"] not in LAYER_INITS:
        raise _bad_config(cfg_file, f"layer_init must be one of {', '.join(LAYER_INITS)}, got {meta['layer_init']!r}")
    meta.setdefault("wipe_layer", None)  # twigs saved before it was recorded: the 0.75·L default
    if meta["wipe_layer"] is not None and type(meta["wipe_layer"]) is not int:
        raise _bad_config(cfg_file, f"wipe_layer must be an integer or null, got {meta['wipe_layer']!r}")
    if meta.get("head") not in HEAD_MODES:
        raise _bad_config(cfg_file, f"head must be one of {', '.join(HEAD_MODES)}, got {meta.get('head')!r}")
    if not isinstance(meta.get("base"), dict):
        raise _bad_config(cfg_file, "the base fingerprint is missing")
    shards = meta.setdefault("shards", [WEIGHTS_NAME])
    if (
        not isinstance(shards, list)
        or not shards
        or shards[0] != WEIGHTS_NAME
        or len(set(shards)) != len(shards)
        or not all(isinstance(n, str) and SHARD.fullmatch(n) for n in shards)
    ):
        raise _bad_config(cfg_file, f"shards must list {WEIGHTS_NAME} first, then twig-N.safetensors files: {shards!r}")
    missing = [n for n in shards if not (d / n).is_file()]
    if missing:
        raise TwigVLMError(f"{d} lacks {missing[0]}, which its {CONFIG_NAME} lists: copy the whole twig directory")
    return meta


def read_twig_tensors(twig_dir: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All of a twig directory's tensors, from its one file or its shards."""
    state: dict[str, torch.Tensor] = {}
    for name in meta["shards"]:
        path = Path(twig_dir) / name
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise TwigVLMError(
                f"{path} is not a readable safetensors file ({e}): grow or train the twig again"
            ) from None
        twice = sorted(set(part) & set(state))
        if twice:
            raise TwigVLMError(f"{path} repeats the tensor {twice[0]} of another shard: grow or train the twig again")
        state.update(part)
    return state


def copy_twig(src: str | Path, dst: str | Path, shard_bytes: int | None = None) -> Path:
    """A saved twig written again elsewhere, its tensors in files of at most `shard_bytes` (the values as saved)."""
    meta = read_twig_config(src)
    return _write_twig(Path(dst), read_twig_tensors(src, meta), meta, shard_bytes)


def load_twig(adapter: VLMAdapter, twig_dir: str | Path) -> Twig:
    """Load a saved twig onto this base (its tensors take the base's dtype and device)."""
    meta = read_twig_config(twig_dir)
    check_fingerprint(meta["base"], adapter, f"{twig_dir} ({CONFIG_NAME})")
    try:
        twig = grow_twig(
            adapter,
            TwigConfig(
                K=meta["K"],
                T=meta["T"],
                head=meta["head"],  # weights follow
                wipe_layer=meta["wipe_layer"],
            ),
        )
    except TwigVLMError as e:
        raise _bad_config(Path(twig_dir) / CONFIG_NAME, str(e)) from None
    twig.config = replace(twig.config, layer_init=meta["layer_init"])
    if meta.get("prune_head"):  # twigs saved before the pruning head existed have none
        twig.add_prune_head(adapter.query_width)
    _load_weights(twig, twig_dir, meta)
    return twig


def load_twig_weights(twig: Twig, twig_dir: str | Path) -> None:
    """Load a saved twig's tensors into an existing twig of the same shape grown on the same base (resuming)."""
    meta = read_twig_config(twig_dir)
    for key in ("K", "T", "head"):
        if meta[key] != getattr(twig.config, key):
            raise TwigVLMError(
                f"the twig in {twig_dir} has {key}={meta[key]!r} but this one has "
                f"{key}={getattr(twig.config, key)!r}: use the same K, T and head"
            )
    base = twig.base_fingerprint
    if any(meta["base"].get(k) != base[k] for k in ARCH_KEYS) or not same_weights(meta["base"], base):
        raise TwigVLMError(f"the twig in {twig_dir} was grown for another base model than this one")
    _load_weights(twig, twig_dir, meta)


def _load_weights(twig: Twig, twig_dir: str | Path, meta: dict[str, Any]) -> None:
    weights = Path(twig_dir) / WEIGHTS_NAME
    state = read_twig_tensors(twig_dir, meta)
    if "draft_vocab" in state:
        twig.set_draft_vocab(state["draft_vocab"])
        vocab_size = twig.base_fingerprint["vocab_size"]
        if int(state["draft_vocab"].min()) < 0 or int(state["draft_vocab"].max()) >= vocab_size:
            raise TwigVLMError(
                f"{weights} has a draft vocabulary with ids outside 0..{vocab_size - 1}: grow or train the twig again"
            )
    expected = twig.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [n for n in state if state[n].shape != expected[n].shape]
    if bad:
        raise TwigVLMError(
            f"{weights} does not match its {CONFIG_NAME} (first mismatching tensor: {bad[0]}): "
            "grow or train the twig again"
        )
    with torch.no_grad():
        twig.load_state_dict(state, strict=True)
