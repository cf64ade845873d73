"""How the loop meets each kind of parallelism: FSDP (checked, a parameter-free skeleton to rebuild whole models from
the gathered state dict), DeepSpeed (``"auto"`` values filled from the recipe, ZeRO-3 detection, whole models built
while a ZeRO-3 engine is live). The loop itself (:mod:`.loop`) calls these and never branches on the backend
otherwise."""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .recipe import Recipe


def check_fsdp(accelerator: Accelerator) -> None:
    """Refuse an FSDP launch that accelerate did not turn into FSDP, and FSDP version 1.

    ``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP=true``, but accelerate enables FSDP only when
    it finds GPUs (or another accelerator): on CPUs every process would otherwise train a whole model of its own (or
    plain DDP with ``ACCELERATE_USE_CPU``), which is not what the config asked for.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if accelerator.distributed_type != DistributedType.FSDP:
        if requested:
            raise RuntimeError(
                f"the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up "
                f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es) on "
                f"{accelerator.device.type}: accelerate enables FSDP only on GPUs. On CPUs use "
                "recipes/accelerate/ddp_cpu.yaml (data parallel) instead."
            )
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"mllm.training.loop supports FSDP version 2 (fully_shard) only, got fsdp_version={version}: set "
                         "`fsdp_version: 2` in the accelerate config (see recipes/accelerate/fsdp.yaml)")



def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory; tied parameters stay tied, buffers are
    copied): the skeleton that :func:`model_from_state_dict` fills once the model itself is sharded."""
    memo = {}
    for param in model.parameters():  # deepcopy returns the memo's entry for each parameter object
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)



def model_from_state_dict(skeleton: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A whole model: a copy of ``skeleton`` (see :func:`meta_copy`) holding the tensors of the full ``state_dict``.

    Tensors are cast to the skeleton's dtypes (FSDP may have upcast trainable parameters to float32 for mixed
    precision; the saved model keeps the dtypes the stage built it with) and assigned without a copy. Parameters that
    were tied in the skeleton are tied again, so a state dict holding only one name of a tied group is enough.

    Raises:
        ValueError: ``state_dict`` has keys the model does not have, a shape that differs, or lacks a parameter or
            persistent buffer.
    """
    model = copy.deepcopy(skeleton)
    expected = model.state_dict()  # meta tensors (and buffers), every name of a tied group included
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise ValueError(f"the gathered state dict has {len(unknown)} key(s) the model does not have: {unknown[:5]}")
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = {name: names for names in groups.values() if len(names) > 1 for name in names}
    missing = []
    for name in expected:
        if name not in state_dict and not any(n in state_dict for n in tied.get(name, ())):
            missing.append(name)
    if missing:
        raise ValueError(f"the gathered state dict lacks {len(missing)} tensor(s) of the model: {missing[:5]}")
    tensors = {}
    for name, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the gathered state dict but "
                             f"{tuple(expected[name].shape)} in the model")
        tensors[name] = value.to(expected[name].dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for names in groups.values():  # assign=True gave each name of a tied group its own tensor (or left it on meta)
        if len(names) > 1:
            source = model.get_parameter(next(n for n in names if n in tensors))
            for name in names:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, source)
    return model



def is_zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3



# DeepSpeed's own defaults, for "auto" bucket sizes that accelerate derives from ``config.hidden_size`` (a visual
# tokenizer has none)
DEEPSPEED_BUCKET_DEFAULTS = {"zero_optimization.reduce_bucket_size": 500_000_000,
                             "zero_optimization.stage3_prefetch_bucket_size": 50_000_000,
                             "zero_optimization.stage3_param_persistence_threshold": 100_000}


def fill_deepspeed_auto(accelerator: Accelerator, recipe: Recipe, model: Optional[torch.nn.Module] = None) -> None:
    """Fill the DeepSpeed config's ``"auto"`` batch size, accumulation and gradient clipping from the recipe (no-op
    without DeepSpeed), and its ``"auto"`` bucket sizes with DeepSpeed's defaults when ``model`` has no
    ``config.hidden_size`` for accelerate to derive them from.

    Without a dataloader accelerate cannot infer ``train_micro_batch_size_per_gpu``; the loop shards each global
    batch itself, so the per-rank micro-batch is ``ceil(batch_size / (world * gradient_accumulation_steps))``.
    DeepSpeed clips gradients inside its step (``clip_grad_norm_`` only reports the norm there), so the recipe's
    ``grad_clip`` must reach its config.
    """
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None:
        return
    cfg = recipe.train
    steps = max(1, int(cfg.gradient_accumulation_steps))
    micro = -(-cfg.batch_size // (accelerator.num_processes * steps))
    plugin.fill_match("train_micro_batch_size_per_gpu", must_match=False, train_micro_batch_size_per_gpu=micro)
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=steps)
    plugin.fill_match("gradient_clipping", must_match=False, gradient_clipping=float(cfg.grad_clip or 0.0))
    config = getattr(model, "config", None)
    if model is not None and not (hasattr(config, "hidden_size") or hasattr(config, "hidden_sizes")):
        for key, value in DEEPSPEED_BUCKET_DEFAULTS.items():
            plugin.fill_match(key, must_match=False, **{key: value})



@contextlib.contextmanager
def built_whole(accelerator: Optional[Accelerator]):
    """Build the stage's models whole even when ``accelerator`` already runs ZeRO-3 (``prepare`` partitions them).

    A live ZeRO-3 Accelerator makes ``from_pretrained`` partition weights while loading (``zero.Init``), which the
    bridge (in-place init of new rows), PEFT and the visual tokenizer (encodes the training images) cannot work with.
    """
    if accelerator is None or not is_zero3(accelerator):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def master_weights_follow(accelerator: Accelerator, params: list):
    """Under DeepSpeed ZeRO-1/2, copy what the code inside wrote into ``params`` (module weights, e.g. a codebook
    the quantizer re-initialises in forward) into the optimizer's fp32 master weights, which the engine's step would
    otherwise copy back over them. A no-op without DeepSpeed, where the optimizer updates the module's own tensors."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED or not params:
        yield
        return
    before = [p.detach().clone() for p in params]
    yield
    from deepspeed.utils import safe_set_full_fp32_param

    for param, old in zip(params, before):
        if not torch.equal(param.detach(), old):
            safe_set_full_fp32_param(param, param.detach().float())
