"""High-level inference on a bridged bundle: text -> images and images -> text, through plain ``model.generate``.

Prompts are built by the processor exactly as during training (same BOS handling, same templates from
:mod:`mllm.data.tasks`), and every call goes through :class:`~mllm.generation.ImageSpanLogitsProcessor`, so generated
image spans are always well formed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import LogitsProcessorList

from tokenizer_bridge.processing_unified import UnifiedProcessor

from .data.tasks import CAPTION_PROMPT, t2i_prompt
from .generation import ImageSpanLogitsProcessor


def _logits_width(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _span_processor(model, processor: UnifiedProcessor, **kwargs) -> LogitsProcessorList:
    return LogitsProcessorList([ImageSpanLogitsProcessor(processor.image_vocab, _logits_width(model), **kwargs)])


def _prompt_batch(processor: UnifiedProcessor, prompts: Sequence[str], image_ids=None, append_boi: bool = False):
    batch = processor(prompt=list(prompts), image_ids=image_ids, padding_side="left")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if append_boi:
        boi = torch.full((len(prompts), 1), processor.image_vocab.boi_token_id, dtype=torch.long)
        input_ids = torch.cat([input_ids, boi], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(boi)], dim=1)
    return input_ids, attention_mask


@torch.no_grad()
def generate_image_ids(
    model,
    processor: UnifiedProcessor,
    captions: Sequence[Optional[str]],
    do_sample: bool = False,
    image_temperature: Optional[float] = None,
    image_top_k: Optional[int] = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """Captions -> image ids ``(B, h, w)`` (grid) of one generated image each (``None`` caption: unconditional)."""
    vocab = processor.image_vocab
    input_ids, attention_mask = _prompt_batch(processor, [t2i_prompt(c) for c in captions], append_boi=True)
    logits_processor = _span_processor(model, processor, image_temperature=image_temperature, image_top_k=image_top_k)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        logits_processor=logits_processor,
        max_new_tokens=vocab.span_length - 1,
        do_sample=do_sample,
        pad_token_id=processor.tokenizer.pad_token_id,
        **generate_kwargs,
    )
    spans = out[:, input_ids.shape[1] - 1 :].cpu()  # (B, span_length): <boi> + generated
    return torch.stack([vocab.parse_span(span) for span in spans])


def text_to_image(model, processor: UnifiedProcessor, captions: Sequence[Optional[str]], **kwargs) -> list:
    """Captions -> PIL images (needs the processor's visual tokenizer)."""
    return processor.image_ids_to_images(list(generate_image_ids(model, processor, captions, **kwargs)))


@torch.no_grad()
def caption_image_ids(model, processor: UnifiedProcessor, image_ids: torch.Tensor, max_new_tokens: int = 16) -> list[str]:
    """Image ids ``(B, h, w)`` -> generated captions (greedy)."""
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
