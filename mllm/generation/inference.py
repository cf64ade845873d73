"""High-level inference on a bridged bundle: text -> images and images -> text, through plain ``model.generate``.

Prompts are built by the processor exactly as during training (same BOS handling, same templates from
:mod:`mllm.data.tasks`), and every call goes through :class:`~mllm.generation.logits.ImageSpanLogitsProcessor`, so generated
image spans are always well formed. Every :class:`~tokenizer_bridge.ImageVocab` layout works: fixed and variable-size
grids, sequences, residual levels (either order, shared or separate id ranges), factorized sub-tokens and unified
codebooks. A variable-size grid generates at the size asked for, per prompt if need be (the prompt ends with
``<boi> <h_k> <w_k>``), by default at :func:`default_image_size`.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from transformers import LogitsProcessorList

from tokenizer_bridge.processing_unified import UnifiedProcessor

from ..data.tasks import CAPTION_PROMPT, t2i_prompt
from .logits import ImageSpanLogitsProcessor, find_image_spans


def _logits_width(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _span_processor(model, processor: UnifiedProcessor, **kwargs) -> LogitsProcessorList:
    return LogitsProcessorList([ImageSpanLogitsProcessor(processor.image_vocab, _logits_width(model), **kwargs)])


def _prompt_batch(processor: UnifiedProcessor, prompts: Sequence[str], image_ids=None, append_boi: bool = False):
    batch = processor(text=list(prompts), image_ids=image_ids, padding=True, padding_side="left",
                      return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if append_boi:
        boi = torch.full((len(prompts), 1), processor.image_vocab.boi_token_id, dtype=torch.long)
        input_ids = torch.cat([input_ids, boi], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(boi)], dim=1)
    return input_ids, attention_mask


ImageSize = Union[None, Sequence[int], Sequence[Sequence[int]]]
DEFAULT_IMAGE_SIZE_KEY = "default_image_size"


def default_image_size(vocab) -> tuple[int, int]:
    """The ``(h, w)`` id grid a variable-size vocabulary generates when no size is asked for: the one recorded in
    ``vocab.extra["default_image_size"]`` (the llm stage records the grid it trained at), else the largest grid."""
    if not vocab.variable_size:
        raise ValueError(f"only variable-size grids choose an image size; this vocabulary's layout is {vocab.layout!r}"
                         + (f" {vocab.grid_size[0]}x{vocab.grid_size[1]}" if vocab.layout == "grid" else ""))
    size = vocab.extra.get(DEFAULT_IMAGE_SIZE_KEY) or vocab.grid_size
    h, w = (int(s) for s in size)
    vocab.size_tokens(h, w)  # raises if a recorded default does not fit the grid
    return h, w


def image_sizes(vocab, image_size: ImageSize, n: int) -> Optional[list[tuple[int, int]]]:
    """The ``(h, w)`` of each of ``n`` images to generate (``None`` for fixed layouts, whose size is the vocabulary's).

    ``image_size`` is ``None`` (:func:`default_image_size`), one ``(h, w)`` for every prompt, or one ``(h, w)`` per
    prompt; only variable-size grids accept a size other than their own.
    """
    if not vocab.variable_size:
        if image_size is not None:
            own = tuple(vocab.grid_size) if vocab.layout == "grid" else None
            pairs = [image_size] if _is_pair(image_size) else list(image_size)
            if own is None or any(tuple(int(s) for s in p) != own for p in pairs):
                shape = f"{own[0]}x{own[1]} grids" if own else f"sequences of {vocab.num_tokens} ids"
                raise ValueError(f"this vocabulary's images are {shape}; image_size={image_size} needs a "
                                 "variable-size grid vocabulary")
        return None
    if image_size is None:
        return [default_image_size(vocab)] * n
    if _is_pair(image_size):
        pairs = [tuple(int(s) for s in image_size)] * n
    else:
        pairs = [tuple(int(s) for s in p) for p in image_size]
        if len(pairs) != n or any(len(p) != 2 for p in pairs):
            raise ValueError(f"image_size must be one (h, w) or one (h, w) per prompt ({n}), got {image_size}")
    for h, w in pairs:
        vocab.size_tokens(h, w)  # raises naming the largest grid
    return pairs


def _check_captions(captions) -> None:
    if isinstance(captions, str):
        raise ValueError("captions must be a list of captions (one image each), got a single string: wrap it in a list")
    if len(captions) == 0:
        raise ValueError("captions is empty: pass at least one caption (None for an unconditional image)")


def _is_pair(size) -> bool:
    return len(size) == 2 and all(isinstance(s, numbers.Integral) or (torch.is_tensor(s) and s.dim() == 0)
                                  for s in size)


def _span_heads(vocab, sizes: Optional[list[tuple[int, int]]], n: int) -> torch.LongTensor:
    """``(n, 1)`` ``<boi>`` or ``(n, 3)`` ``<boi> <h_k> <w_k>``: the tokens that open each prompt's span."""
    if sizes is None:
        return torch.full((n, 1), vocab.boi_token_id, dtype=torch.long)
    return torch.tensor([[vocab.boi_token_id, *vocab.size_tokens(h, w)] for h, w in sizes], dtype=torch.long)


@torch.no_grad()
def generate_image_ids(
    model,
    processor: UnifiedProcessor,
    captions: Sequence[Optional[str]],
    do_sample: bool = False,
    image_temperature: Optional[float] = None,
    image_top_k: Optional[int] = None,
    image_size: ImageSize = None,
    **generate_kwargs,
):
    """Captions -> image ids of one generated image each (``None`` caption: unconditional).

    Returns ``(B, h, w)`` for grids or ``(B, N)`` for sequences, with a trailing level axis ``L`` for residual
    vocabularies (``B`` = prompts x ``num_return_sequences``). For a variable-size grid, ``image_size`` is one
    ``(h, w)`` for every prompt (default :func:`default_image_size`) or a list of one ``(h, w)`` per prompt, in
    which case a list of per-image tensors is returned (rows that finish their smaller span early go on with text,
    which is ignored, while the others complete theirs). A sequence with token budgets lets the model choose each
    span's budget and also returns a list. An empty ``captions`` list raises ``ValueError``; ``max_new_tokens`` (set
    from the span length) raises ``TypeError``. Every size the vocabulary spells decodes, 1x1 included
    (:meth:`UnifiedProcessor.image_ids_to_images`).
    """
    if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
        raise TypeError("generate_image_ids sets max_new_tokens itself (the span length); do not pass "
                        "max_new_tokens or max_length")
    _check_captions(captions)
    vocab = processor.image_vocab
    per_prompt = vocab.variable_size and image_size is not None and not _is_pair(image_size)
    sizes = image_sizes(vocab, image_size, len(captions))
    heads = _span_heads(vocab, sizes, len(captions))
    input_ids, attention_mask = _prompt_batch(processor, [t2i_prompt(c) for c in captions])
    input_ids = torch.cat([input_ids, heads], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones_like(heads)], dim=1)
    lengths = [vocab.span_length_of(*s) for s in sizes] if sizes else [vocab.span_length] * len(captions)
    logits_processor = _span_processor(model, processor, allow_images_in_text=False,
                                       image_temperature=image_temperature, image_top_k=image_top_k)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        logits_processor=logits_processor,
        max_new_tokens=max(lengths) - heads.shape[1],
        do_sample=do_sample,
        pad_token_id=processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    generated = out[:, input_ids.shape[1] - heads.shape[1] :].cpu()  # <boi> (+ size tokens) + generated tokens
    images = [vocab.parse_span(row[slice(*find_image_spans(row, vocab)[0])]) for row in generated]
    if per_prompt or getattr(vocab, "has_budgets", False):  # sizes may differ (a budgeted sequence's model chooses)
        return images
    return torch.stack(images)


def text_to_image(model, processor: UnifiedProcessor, captions: Sequence[Optional[str]], **kwargs) -> list:
    """Captions -> PIL images (needs the processor's visual tokenizer); ``kwargs`` as :func:`generate_image_ids`."""
    return processor.image_ids_to_images(list(generate_image_ids(model, processor, captions, **kwargs)))


@torch.no_grad()
def caption_image_ids(model, processor: UnifiedProcessor, image_ids, max_new_tokens: int = 16) -> list[str]:
    """Image ids -> generated captions (greedy): a batch tensor ``(B, h, w)`` / ``(B, N)`` (with a trailing level
    axis for residual vocabularies) or a list of per-image tensors (variable-size grids: each its own ``(h, w)``)."""
    prompts = [CAPTION_PROMPT] * len(image_ids)
    input_ids, attention_mask = _prompt_batch(processor, prompts, image_ids=list(image_ids))
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        logits_processor=_span_processor(model, processor, allow_images_in_text=False),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
    )
    new = out[:, input_ids.shape[1] :]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def caption_images(model, processor: UnifiedProcessor, images, **kwargs) -> list[str]:
    """PIL images -> captions (needs the processor's visual tokenizer)."""
    return caption_image_ids(model, processor, processor.encode_images(images), **kwargs)
