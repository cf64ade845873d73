"""The loop's numerics: its AdamW (torch's fused kernel wherever it applies) and ``train.mixed_precision``.

The default (for-loop) AdamW launches a dozen small kernels per parameter tensor; the fused one updates every tensor
in one pass. Same update rule, same ``state_dict`` layout (a checkpoint of either resumes into the other), but not
the same rounding (``train.fused_optimizer: false`` keeps the for-loop kernel). Measured on the demo's depth-4 ViT
tokenizer (94 tensors, 0.6M parameters; ``bench/results/demo_steps.md``): 0.62-0.67 ms per step against 3.9-4.5 ms,
~9% of a whole training step on 2 CPU cores.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator

MIXED_PRECISION = (None, "no", "bf16")

# the devices torch's fused AdamW runs on (torch.utils._foreach_utils._get_fused_kernels_supported_devices)
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def fused_supported(params: list[torch.nn.Parameter], sharded: bool = False) -> bool:
    """Whether every parameter is a plain floating-point tensor on one device the fused kernel supports. Sharded
    (FSDP) parameters keep the default implementation."""
    if sharded or not params:
        return False
    if any(type(p.data) is not torch.Tensor or not p.is_floating_point() or p.is_sparse for p in params):
        return False
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES


def adamw(params: list[torch.nn.Parameter], *, lr: float, betas, weight_decay: float, fused: bool = True,
          sharded: bool = False) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params``: fused when asked for (``train.fused_optimizer``) and
    :func:`fused_supported`, else torch's default."""
    fused = True if fused and fused_supported(params, sharded) else None
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


def check_mixed_precision(value) -> None:
    """``train.mixed_precision``: null (the accelerate launch config decides), "no" or "bf16"."""
    if value not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision must be null (the accelerate config decides), 'no' or 'bf16', got "
                         f"{value!r}; fp16 needs loss scaling: set it in the accelerate config instead")


def mixed_precision_context(accelerator: Accelerator, value):
    """A context manager for the loop's forward and loss under ``train.mixed_precision``.

    "bf16": bfloat16 autocast on the accelerator's device (weights, gradients and optimizer state stay float32, as
    with accelerate's own bf16), unless the launch config already runs bf16. A recipe that asks for one precision
    while the launch config runs another is refused, so a run never trains in a precision nobody asked for."""
    launched = str(accelerator.mixed_precision)
    if value is None or value == launched:
        return contextlib.nullcontext
    if launched != "no":
        raise ValueError(f"train.mixed_precision is {value!r} but the accelerate launch config runs {launched!r}: "
                         "set one of them to match the other (or train.mixed_precision=null to follow the config)")
    if value == "no":
        return contextlib.nullcontext
    device = accelerator.device.type
    return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
