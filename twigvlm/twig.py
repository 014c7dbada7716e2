"""The twig: T decoder layers grown after base layer K, with a norm and a head — grow, save, load.

Growing copies base layers K+1..K+T (1-based) into new layers, the base final norm into the twig norm, and the
LM head into a twig head ("copy") or reuses the frozen base head ("shared"). Every base parameter is frozen.
Saving writes only the twig (`twig.safetensors` + `twig.json` with a fingerprint of the base); loading onto a
base with another fingerprint is refused with a message naming the mismatch.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.base import VLMAdapter
from .config import TwigConfig
from .errors import TwigVLMError

WEIGHTS_NAME = "twig.safetensors"
CONFIG_NAME = "twig.json"
FORMAT = "twigvlm-twig"
FORMAT_VERSION = 1


class Twig(nn.Module):
    """T decoder layers + norm (+ head, unless shared with the base). Layer i is a stock HF decoder layer."""

    def __init__(self, config: TwigConfig, layers: nn.ModuleList, norm: nn.Module, head: nn.Module | None,
                 base_fingerprint: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self.norm = norm
        self.head = head
        self.base_fingerprint = base_fingerprint

    def extra_repr(self) -> str:
        return f"K={self.config.K}, T={self.config.T}, head={self.config.head}"


def base_fingerprint(adapter: VLMAdapter) -> dict[str, Any]:
    """What identifies the base a twig belongs to: architecture facts plus a hash of a few weights."""
    spec = adapter.spec
    return {"model_type": spec.model_type, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "vocab_size": spec.vocab_size, "weights_hash": adapter.weights_hash()}


def freeze_base(adapter: VLMAdapter) -> None:
    """No base parameter takes gradients (twig parameters live in their own module)."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)


def grow_twig(adapter: VLMAdapter, config: TwigConfig = TwigConfig()) -> Twig:
    """A new twig initialised from base layers K+1..K+T, the base final norm and (for "copy") the LM head."""
    spec = adapter.spec
    config.validate(spec.num_layers)
    config = config.resolved(spec.tied_embeddings)
    layers = nn.ModuleList(copy.deepcopy(adapter.layers[config.K + t]) for t in range(config.T))
    norm = copy.deepcopy(adapter.final_norm)
    head = copy.deepcopy(adapter.lm_head) if config.head == "copy" else None
    freeze_base(adapter)
    twig = Twig(config, layers, norm, head, base_fingerprint(adapter)).train(False)
    twig.requires_grad_(True)
    return twig


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_twig(twig: Twig, out_dir: str | Path) -> Path:
    """Write twig.safetensors (twig tensors only) and twig.json (config, dtype, base fingerprint)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TwigVLMError(f"{out} exists and is not a directory: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in twig.state_dict().items()}
    dtype = str(next(twig.parameters()).dtype).removeprefix("torch.")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "K": twig.config.K, "T": twig.config.T,
            "head": twig.config.head, "dtype": dtype, "base": twig.base_fingerprint}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_twig_config(twig_dir: str | Path) -> dict[str, Any]:
    """twig.json of a twig directory, checked for format."""
    d = Path(twig_dir)
    cfg_file, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir() or not cfg_file.is_file() or not weights.is_file():
        raise TwigVLMError(f"{d} is not a twig directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(made by `twigvlm grow` or `twigvlm train`)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise TwigVLMError(f"{cfg_file} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise TwigVLMError(f"{cfg_file} is not a twigvlm twig (format {meta.get('format')!r} "
                           f"version {meta.get('version')!r})")
    return meta


def check_fingerprint(expected: dict[str, Any], adapter: VLMAdapter, source: str) -> None:
    """Refuse a twig grown on another base, naming the first mismatch."""
    actual = base_fingerprint(adapter)
    for key, value in expected.items():
        if actual.get(key) != value:
            what = "its weights differ" if key == "weights_hash" else f"{key} is {actual.get(key)!r}"
            raise TwigVLMError(f"the twig in {source} was grown for another base model ({key}={value!r}, but this "
                               f"model's {what}): grow or train a twig for this model")


def load_twig(adapter: VLMAdapter, twig_dir: str | Path) -> Twig:
    """Load a saved twig onto this base (its tensors take the base's dtype and device)."""
    meta = read_twig_config(twig_dir)
    check_fingerprint(meta["base"], adapter, str(twig_dir))
    twig = grow_twig(adapter, TwigConfig(K=meta["K"], T=meta["T"], head=meta["head"]))
    state = load_file(str(Path(twig_dir) / WEIGHTS_NAME))
    expected = set(twig.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TwigVLMError(f"{twig_dir}/{WEIGHTS_NAME} does not match its {CONFIG_NAME}: "
                           f"missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        twig.load_state_dict(state, strict=True)
    return twig
