"""Batched classifier-free guidance: one forward over ``2B`` rows per step, conditional and unconditional halves.

Token-based text-to-image generators (LlamaGen arXiv:2406.06525, Janus arXiv:2410.13848) run the conditional prompts
and the unconditional ones as one batch: rows ``0..B-1`` hold the conditional sequences, rows ``B..2B-1`` their
unconditional twins, both left-padded to one length, and every step feeds the token drawn for conditional row ``i`` to
row ``i`` and row ``B + i``. :func:`generate_with_batched_guidance` is that decode loop over plain ``model(...)`` with
one :class:`~transformers.DynamicCache` (or :class:`~transformers.StaticCache`), built so that it reproduces
``model.generate`` run with :class:`~mllm.generation.guidance.ImageCFGLogitsProcessor` (the unbatched path, two
``B``-row forwards per step): the same positions (count of real tokens, pads at 0), the same processor list applied
to float32 logits, then the sampling warpers ``generate`` would add from the resolved generation config
(``temperature``, ``top_k``, ``top_p``, ``min_p``, in ``generate``'s order), and the same token choice --
``torch.argmax``, or ``softmax`` + one ``torch.multinomial`` call over the ``B`` conditional rows per step, so a
seeded run draws what ``generate`` draws. Results equal the unbatched path's to float tolerance (greedy ids are the
same; so are sampled ids under the same seed unless a draw lands within rounding of a bin edge).

It holds both halves in one cache of ``2B`` rows and runs ``2B``-row forwards: fewer, larger matrix products and one
pass over the weights per step (the gain at small batches), at the price of a ``2B``-row peak (prefill activations,
the cache growing as one tensor) and of padding both halves to the longer prompt. Settings the loop cannot honour --
beam search, repetition penalties, banned words, streamers, stopping criteria, extra logits processors, scores in the
output and so on -- raise ``TypeError`` / ``ValueError`` naming them (use the unbatched path for those).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from transformers import DynamicCache, LogitsProcessorList, StaticCache
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# generate() keyword arguments the batched loop honours (everything else raises TypeError).
ACCEPTED_KWARGS = ("num_return_sequences", "temperature", "top_k", "top_p", "min_p", "num_beams", "use_cache",
                   "cache_implementation", "pad_token_id", "eos_token_id", "bos_token_id")
# Resolved generation-config fields that would add a processor generate applies and this loop does not: the value
# each must keep (a callable: the test a value must pass).
_UNSUPPORTED_SETTINGS = {
    "num_beams": lambda v: v is None or int(v) == 1,
    "repetition_penalty": lambda v: v is None or float(v) == 1.0,
    "no_repeat_ngram_size": lambda v: not v,
    "encoder_no_repeat_ngram_size": lambda v: not v,
    "bad_words_ids": lambda v: v is None,
    "min_length": lambda v: not v,
    "min_new_tokens": lambda v: not v,
    "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None,
    "remove_invalid_values": lambda v: not v,
    "exponential_decay_length_penalty": lambda v: v is None,
    "suppress_tokens": lambda v: v is None,
    "begin_suppress_tokens": lambda v: v is None,
    "sequence_bias": lambda v: v is None,
    "guidance_scale": lambda v: v is None or float(v) == 1.0,
    "top_h": lambda v: v is None,
    "typical_p": lambda v: v is None or float(v) >= 1.0,
    "epsilon_cutoff": lambda v: v is None or not 0.0 < float(v) < 1.0,
    "eta_cutoff": lambda v: v is None or not 0.0 < float(v) < 1.0,
    "renormalize_logits": lambda v: not v,
    "watermarking_config": lambda v: v is None,
    "output_scores": lambda v: not v,
    "output_logits": lambda v: not v,
    "return_dict_in_generate": lambda v: not v,
    "use_cache": lambda v: v is None or bool(v),
    "cache_implementation": lambda v: v in (None, "dynamic", "static"),
}


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >= 5.x) or
    ``past_key_values`` (earlier releases and remote code)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def check_kwargs(generate_kwargs: dict) -> None:
    """``TypeError`` naming every keyword of ``generate_kwargs`` that is not in ``ACCEPTED_KWARGS``."""
    unknown = sorted(set(generate_kwargs) - set(ACCEPTED_KWARGS))
    if unknown:
        raise TypeError(f"cfg_batched=True does not take {', '.join(unknown)}: the batched guidance loop honours only "
                        f"{', '.join(ACCEPTED_KWARGS)} (and do_sample); pass cfg_batched=False to hand other settings "
                        "to model.generate")


def resolve_sampling(model, do_sample: bool, generate_kwargs: dict):
    """``(generation_config, warpers)``: the generation config ``model.generate`` would use for ``generate_kwargs``
    (the model's own ``generation_config`` and transformers' global defaults filled in, e.g. ``top_k=50`` when
    sampling), and the sampling warpers generate would append after the caller's processors.

    ``TypeError`` for a keyword the loop does not take, ``ValueError`` for a resolved setting it cannot follow."""
    check_kwargs(generate_kwargs)
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:
        raise TypeError(f"{type(model).__name__} has no generation config (not a transformers GenerationMixin model)")
    config, model_kwargs = prepare(None, do_sample=do_sample, **generate_kwargs)  # what generate() itself calls
    if model_kwargs:
        raise TypeError(f"cfg_batched=True does not take model inputs {sorted(model_kwargs)}")
    refused = [f"{name}={getattr(config, name, None)!r}" for name, ok in _UNSUPPORTED_SETTINGS.items()
               if not ok(getattr(config, name, None))]
    if refused:
        raise ValueError(f"batched classifier-free guidance cannot follow the generation settings {', '.join(refused)} "
                         "(from the call or the model's generation_config); unset them or pass cfg_batched=False")
    if config.num_return_sequences is not None and int(config.num_return_sequences) < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {config.num_return_sequences}")
    warpers = LogitsProcessorList()
    if do_sample:  # the order and conditions of generate's own warpers
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return config, warpers


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], dim=1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1))


@torch.no_grad()
def generate_with_batched_guidance(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    uncond_input_ids: torch.LongTensor,
    uncond_attention_mask: torch.Tensor,
    guidance,
    logits_processor: LogitsProcessorList,
    max_new_tokens: int,
    do_sample: bool = False,
    pad_token_id: int = 0,
    done: Optional[Callable[[torch.LongTensor], bool]] = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """Decode ``max_new_tokens`` tokens after ``input_ids`` with guidance computed in the same forward.

    Args:
        input_ids, attention_mask: ``(B, P)`` conditional prompts, left-padded (as ``model.generate`` takes them).
        uncond_input_ids, uncond_attention_mask: ``(B0, P0)`` unconditional prompts; ``B0`` divides ``B`` times
            ``num_return_sequences`` (row ``i`` of the expanded batch gets prompt ``i // (B * n / B0)``, as
            :class:`~mllm.generation.guidance.ImageCFGLogitsProcessor` spreads them).
        guidance: receives the unconditional half's float32 logits ``(B, V)`` of each step through
            ``guidance.set_unconditional(logits)`` before ``logits_processor`` runs; it should be the first entry of
            ``logits_processor`` (the processor that mixes them into the conditional rows).
        logits_processor: applied to ``(conditional ids, conditional float32 logits)`` every step, then the sampling
            warpers of the resolved generation config.
        done: called with the conditional sequences after each step; decoding stops early when it returns True.
        generate_kwargs: the few ``generate`` settings in ``ACCEPTED_KWARGS``; ``cache_implementation="static"``
            preallocates a :class:`~transformers.StaticCache` for the whole run.

    Returns ``(B * n, P + new)`` ids: the conditional prompts (expanded by ``num_return_sequences``) and the tokens
    generated, as ``model.generate`` returns them.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config, warpers = resolve_sampling(model, do_sample, generate_kwargs)
    repeats = int(config.num_return_sequences or 1)
    device = model.device
    cond_ids = input_ids.to(device).repeat_interleave(repeats, dim=0)
    cond_mask = attention_mask.to(device).long().repeat_interleave(repeats, dim=0)
    batch, prompts = cond_ids.shape[0], uncond_input_ids.shape[0]
    if batch % prompts:
        raise ValueError(f"{prompts} unconditional prompts cannot be spread over a batch of {batch} rows")
    uncond_ids = uncond_input_ids.to(device).repeat_interleave(batch // prompts, dim=0)
    uncond_mask = uncond_attention_mask.to(device).long().repeat_interleave(batch // prompts, dim=0)
    length = max(cond_ids.shape[1], uncond_ids.shape[1])
    padded_cond = _left_pad(cond_ids, cond_mask, length, pad_token_id)
    padded_uncond = _left_pad(uncond_ids, uncond_mask, length, pad_token_id)
    step_ids = torch.cat([padded_cond[0], padded_uncond[0]])  # (2B, P)
    mask = torch.cat([padded_cond[1], padded_uncond[1]])
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)  # as generate makes them
    if config.cache_implementation == "static":
        cache = StaticCache(config=model.config, max_cache_len=length + max_new_tokens)
    else:
        cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    extra[cache_kwarg(model)] = cache
    sequences = cond_ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)  # (2B, V)
        del out
        guidance.set_unconditional(logits[batch:])
        scores = warpers(sequences, logits_processor(sequences, logits[:batch]))
        if do_sample:
            next_tokens = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if done is not None and done(sequences):
            break
        step_ids = torch.cat([next_tokens, next_tokens])[:, None]  # the drawn token goes to both halves
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
    return sequences
