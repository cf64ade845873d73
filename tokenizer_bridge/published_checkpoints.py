"""Conversion of the published IBQ, Open-MAGVIT2 and LlamaGen checkpoints into :class:`PublishedVQTokenizer` folders
(``vtok convert``): safe unpickling, EMA selection, the key tables, and the architecture read from the original YAML
or inferred from the weights' shapes.

**Safe loading.** The originals are pickles (Lightning ``.ckpt``, ``torch.save`` ``.pt``). They are read with
``torch.load(weights_only=True)``, which rebuilds tensors, containers and numbers and nothing else; the only class
allowed beyond those is ``argparse.Namespace`` (LlamaGen stores its training arguments as one). A file that needs
any other global is refused, without running it, by :class:`UnsafeCheckpointError`, which names the global and the
``trust_pickle`` option (``--trust-pickle``) that loads it with full unpickling, for files the user trusts.

**What a checkpoint holds, and what is taken.**

- IBQ / Open-MAGVIT2 (Lightning): ``{"state_dict": {...}, "optimizer_states", "epoch", ...}``. ``state_dict`` holds
  the generator (``encoder.*``, ``decoder.*``, ``quantize.*``, ``quant_conv.*``, ``post_quant_conv.*``), the loss
  module (``loss.*``: discriminator, LPIPS) and, with ``use_ema``, ``model_ema.*``: LitEma keeps every trainable
  parameter ``p.q.r`` as the buffer ``model_ema.pqr`` (dots removed) plus ``model_ema.decay`` /
  ``model_ema.num_updates``. With EMA (the default when present) each parameter is read from its EMA buffer;
  buffers (none in these models) would come from ``state_dict``.
- LlamaGen: ``{"model": {...}, "ema": {...}?, "discriminator", "optimizer", "optimizer_disc", "steps", "args"}``;
  ``ema`` (a full copy of the model's state) is taken when present, else ``model`` (or ``state_dict``).

``loss.*``, ``model_ema.*`` and every other top-level entry are dropped. Key tables (original -> ours), all 1:1:

================================  =====================================  =====================================
family                            original key                           key here
================================  =====================================  =====================================
IBQ                               ``encoder.*``, ``decoder.*``           same (``TamingEncoder/Decoder``)
IBQ                               ``quantize.embedding.weight``          same (``IndexPropagationCodebook``)
IBQ, LlamaGen                     ``quant_conv.*``, ``post_quant_conv.*``  same
IBQ, Open-MAGVIT2 with EMA        ``model_ema.<key without dots>``       ``<key>`` (every parameter)
Open-MAGVIT2                      ``encoder.*``, ``decoder.*``           same (``MagvitEncoder/Decoder``)
Open-MAGVIT2                      (LFQ has no persistent state)          --
LlamaGen                          ``encoder.*``, ``decoder.*``           same (``LlamaGenEncoder/Decoder``)
LlamaGen                          ``quantize.embedding.weight``,         same (``LlamaGenCodebook``)
                                  ``quantize.codebook_used``
all                               ``loss.*``, ``model_ema.decay``,       dropped
                                  ``model_ema.num_updates``, ``lpips``
================================  =====================================  =====================================

Anything else left in the generator's weights, or any weight the model needs and the file lacks, is a
:class:`CheckpointKeyError` naming the keys.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Optional, Union

import torch

from .configuration_published_vq import PublishedVQConfig
from .modeling_published_vq import PublishedVQTokenizer

PathLike = Union[str, os.PathLike]
ALLOWED_GLOBALS = [argparse.Namespace]
CLI_FAMILIES = {"ibq": "ibq", "open-magvit2": "open_magvit2", "llamagen": "llamagen"}
_DROPPED = re.compile(r"^(loss\.|model_ema\.|lpips|inception_model)")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose unpickling needs a global outside :data:`ALLOWED_GLOBALS`."""


class CheckpointKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: PathLike, trust_pickle: bool = False) -> dict:
    """The unpickled checkpoint at ``path`` (tensors on the CPU), safely unless ``trust_pickle``."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"the global {found.group(1)}" if found else "an object torch.load(weights_only=True) cannot rebuild"
        raise UnsafeCheckpointError(
            f"{path} was refused: unpickling it needs {what}, which is outside the allow-list of plain types "
            f"(tensors, containers, numbers, strings, argparse.Namespace); nothing in it was run. If you trust this "
            f"file, load it with --trust-pickle (vtok convert) / trust_pickle=True, which unpickles it fully and can "
            f"run arbitrary code."
        ) from None


def generator_state(checkpoint: dict, use_ema: bool = True) -> tuple[dict, str]:
    """``(weights, where they came from)``: the generator's weights under their original names, EMA when asked and
    present, with loss-module, EMA-bookkeeping and other entries dropped."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if use_ema and isinstance(checkpoint.get("ema"), dict):
        return dict(checkpoint["ema"]), "ema"
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state, source = dict(checkpoint[key]), key
            break
    else:
        if not all(torch.is_tensor(v) for v in checkpoint.values()):
            raise ValueError(f"no weights found: expected a 'state_dict', 'model' or 'ema' entry, got keys "
                             f"{sorted(checkpoint)[:10]}")
        state, source = dict(checkpoint), "state dict"
    ema = {k[len("model_ema."):]: v for k, v in state.items() if k.startswith("model_ema.")}
    state = {k: v for k, v in state.items() if not _DROPPED.match(k)}
    ema.pop("decay", None), ema.pop("num_updates", None)
    if use_ema and ema:
        return _apply_lit_ema(state, ema), f"{source} (EMA: model_ema.*)"
    return state, source


def _apply_lit_ema(state: dict, ema: dict) -> dict:
    """Replace each generator weight ``a.b.c`` by LitEma's ``model_ema.abc`` (parameters only; buffers stay)."""
    by_flat = {}
    for key in state:
        flat = key.replace(".", "")
        if flat in by_flat:
            raise CheckpointKeyError(f"EMA names are ambiguous: {by_flat[flat]!r} and {key!r} both become {flat!r}")
        by_flat[flat] = key
    out = dict(state)
    for flat, value in ema.items():
        if flat in by_flat:
            out[by_flat[flat]] = value
    return out


# ---------------------------------------------------------------------------------------------------- architecture
def config_from_yaml(family: str, path: PathLike) -> PublishedVQConfig:
    """The architecture in an original YAML config (Lightning CLI ``model.init_args`` or taming ``model.params``)."""
    import yaml

    with open(path) as f:
        document = yaml.safe_load(f)
    model = (document or {}).get("model") or {}
    args = model.get("init_args") or model.get("params") or {}
    dd = args.get("ddconfig")
    if not dd:
        raise ValueError(f"{path}: no model.init_args.ddconfig (or model.params.ddconfig) section")
    values = dict(family=family, ch=dd["ch"], ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"],
                  z_channels=dd["z_channels"], resolution=dd.get("resolution", 256),
                  attn_resolutions=dd.get("attn_resolutions", []), in_channels=dd.get("in_channels", 3),
                  out_ch=dd.get("out_ch", 3), dropout=dd.get("dropout", 0.0), codebook_size=args["n_embed"],
                  embed_dim=args["embed_dim"], l2_normalize=args.get("l2_normalize", False))
    if dd.get("double_z"):
        raise ValueError(f"{path}: double_z=True (a KL autoencoder's encoder) is not a published VQ tokenizer")
    if args.get("token_factorization"):
        values["factorized_bits"] = args.get("factorized_bits", [9, 9])
    return PublishedVQConfig(**values)


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def infer_config(family: str, state: dict) -> PublishedVQConfig:
    """The architecture the weights' names and shapes imply (the resolution-independent fields; ``resolution``
    256, IBQ's ``attn_resolutions`` the sides of the levels that hold attention at that resolution)."""
    try:
        return _infer(family, state)
    except KeyError as error:
        raise CheckpointKeyError(f"cannot infer a {family} architecture: the weights lack {error.args[0]!r}") from None


def _infer(family: str, state: dict) -> PublishedVQConfig:
    levels_key = "conv_blocks" if family == "llamagen" else "down"
    block_key = "res" if family == "llamagen" else "block"
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = _count(state, rf"encoder\.{levels_key}\.(\d+)\.")
    ch_mult = [state[f"encoder.{levels_key}.{i}.{block_key}.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    values = dict(family=family, ch=ch, ch_mult=ch_mult, in_channels=state["encoder.conv_in.weight"].shape[1],
                  num_res_blocks=_count(state, rf"encoder\.{levels_key}\.0\.{block_key}\.(\d+)\."),
                  out_ch=state["decoder.conv_out.weight"].shape[0], z_channels=state["encoder.conv_out.weight"].shape[0])
    if family == "open_magvit2":
        z = values["z_channels"]
        return PublishedVQConfig(**values, embed_dim=z, codebook_size=2**z, attn_resolutions=[], resolution=128,
                                 factorized_bits=[6, 12] if z == 18 else None)
    codebook = state["quantize.embedding.weight"]
    values.update(codebook_size=codebook.shape[0], embed_dim=codebook.shape[1])
    if family == "llamagen":
        return PublishedVQConfig(**values, attn_resolutions=[], codebook_l2_norm=True,
                                 codebook_show_usage="quantize.codebook_used" in state)
    attn = [256 // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in state]
    return PublishedVQConfig(**values, resolution=256, attn_resolutions=attn)


def describe(config: PublishedVQConfig) -> str:
    fields = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "codebook_size")
    extra = {"ibq": ("attn_resolutions", "resolution"), "llamagen": ("codebook_show_usage",),
             "open_magvit2": ("factorized_bits",)}[config.family]
    return f"{config.family}: " + ", ".join(f"{k}={getattr(config, k)}" for k in fields + extra)


# ---------------------------------------------------------------------------------------------------- conversion
def load_weights(model: PublishedVQTokenizer, state: dict) -> None:
    """Load ``state`` into ``model``, refusing any missing or unexpected key (named) and any shape mismatch."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointKeyError(f"the checkpoint does not match a {model.config.family} model: missing keys "
                                 f"{missing[:20]}{' ...' if len(missing) > 20 else ''}, unexpected keys "
                                 f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointKeyError(f"shape mismatches (checkpoint vs model): {wrong[:10]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def convert_checkpoint(family: str, checkpoint: PathLike, out: Optional[PathLike] = None, *,
                       config: Union[PathLike, PublishedVQConfig, None] = None, use_ema: bool = True,
                       trust_pickle: bool = False, log=print) -> PublishedVQTokenizer:
    """Read an original checkpoint and return (and, with ``out``, ``save_pretrained``) the tokenizer. ``family``:
    ``ibq``, ``open-magvit2`` (or ``open_magvit2``) or ``llamagen``; ``config``: the original YAML, a
    :class:`PublishedVQConfig`, or None to infer the architecture from the weights."""
    family = CLI_FAMILIES.get(family, family)
    if family not in CLI_FAMILIES.values():
        raise ValueError(f"family must be one of {sorted(CLI_FAMILIES)}, got {family!r}")
    state, source = generator_state(load_checkpoint(checkpoint, trust_pickle), use_ema=use_ema)
    log(f"weights: {source}, {len(state)} tensors")
    if isinstance(config, PublishedVQConfig):
        pass
    elif config is not None:
        path, config = config, config_from_yaml(family, config)
        log(f"architecture from {path}: {describe(config)}")
    else:
        config = infer_config(family, state)
        log(f"inferred architecture: {describe(config)}")
    model = PublishedVQTokenizer(config)
    load_weights(model, state)
    if out is not None:
        model.save_pretrained(out)
        log(f"wrote {Path(out)} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model.eval()

