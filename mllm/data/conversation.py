"""Multi-pair examples -> ``input_ids``/``labels``: chat conversations with the loss on assistant turns only.

The processor (:class:`~tokenizer_bridge.UnifiedProcessor`) takes one prompt and one target per sample. A
conversation is cut into ``(context, assistant turn)`` pairs by rendering it with the LLM's own chat template
(``tokenizer.apply_chat_template``) twice per assistant turn: the conversation up to the turn with the generation
prompt, and the conversation including the turn. The turn's text is what the second adds to the first, so it
holds the reply *and* the template's end-of-turn tokens (the model learns to stop); everything else (system prompt,
user turns, role headers) is context without loss. Each pair goes through the processor as one (prompt, target)
sample and the pieces are concatenated, so ``<image>`` placeholders work in user and assistant turns alike.

Text is tokenized per piece (between placeholders and at turn boundaries), which is what the processor does around
images anyway; chat templates put special tokens at every turn boundary, so the cut does not change the tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .packing import PaddingCollator


def message_text(content, placeholder: str = "<image>") -> str:
    """A message's content as one string: a ``str`` as is, or HF-style parts (``{"type": "text", "text": ...}``,
    ``{"type": "image"}``) joined with ``placeholder`` for each image."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            pieces.append(placeholder)
        elif kind == "text":
            pieces.append(part["text"])
        else:
            raise ValueError(f"message parts must have type 'text' or 'image', got {kind!r}")
    return " ".join(pieces)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def split_conversation(tokenizer, messages: Sequence[dict]) -> list[tuple[str, str]]:
    """``[(context, assistant turn), ...]`` for each assistant message, rendered with ``tokenizer``'s template.

    Text after the last assistant turn (a trailing user message) would carry no loss and is dropped.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template); set one to train on chats")
    msgs = [{"role": m["role"], "content": message_text(m["content"])} for m in messages]
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("the conversation has no assistant turn, so nothing would get the loss")
    pairs, done = [], ""
    for i, message in enumerate(msgs):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, msgs[:i], add_generation_prompt=True)
        after = render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(
                f"the chat template does not render turn {i} as an extension of the turns before it, so the "
                "assistant text cannot be cut out for the loss (templates that rewrite earlier turns are unsupported)"
            )
        pairs.append((before[len(done):], after[len(before):]))
        done = after
    return pairs


def encode_example(processor, example, return_loss_masks: bool = False) -> dict[str, list]:
    """One example (``mllm.data.tasks.Example``) -> unpadded ``input_ids``/``labels`` (+ the processor's loss masks)
    lists, loss on its targets only.

    Chat examples get no extra special tokens (their template wrote them); others get the tokenizer's BOS before the
    first pair and EOS after the last target, as a single processor call would add.
    """
    groups = _image_groups(example, processor.placeholder)
    pairs, last = example.pairs, len(example.pairs) - 1
    if example.chat:
        rows = [_call(processor, pairs, groups, return_loss_masks, add_special_tokens=False, add_eos=False)]
    else:
        rows = [_call(processor, [pair], [group], return_loss_masks, add_special_tokens=k == 0, add_eos=k == last)
                for k, (pair, group) in enumerate(zip(pairs, groups))]
    names = [n for n in rows[0] if n != "attention_mask"]
    return {n: [v for r in rows for seq in r[n] for v in seq] for n in names}


def encode_examples(processor, examples: Sequence, return_loss_masks: bool = False) -> list[dict[str, list]]:
    """A batch of examples -> one unpadded sample dict each (pad with :func:`pad` or a packing collator).

    Single-pair, non-chat examples (the common case) share one batched processor call; the rest go one by one.
    """
    encoded: list = [None] * len(examples)
    simple = [k for k, ex in enumerate(examples) if not ex.chat and len(ex.pairs) == 1]
    if simple:
        groups = [_image_groups(examples[k], processor.placeholder)[0] for k in simple]
        batch = _call(processor, [examples[k].pairs[0] for k in simple], groups, return_loss_masks)
        names = [n for n in batch if n != "attention_mask"]
        for row, k in enumerate(simple):
            encoded[k] = {n: batch[n][row] for n in names}
    for k, example in enumerate(examples):
        if encoded[k] is None:
            encoded[k] = encode_example(processor, example, return_loss_masks)
    return encoded


def pad(processor, samples: Sequence[dict], padding_side: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Pad unpadded samples to the longest: ``input_ids``, ``attention_mask``, ``labels`` (+ masks) tensors."""
    tokenizer = processor.tokenizer
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return PaddingCollator(pad_token_id=pad_id, padding_side=padding_side or processor.padding_side)(samples)


def _image_groups(example, placeholder: str) -> list[list]:
    """The example's images split per pair, in reading order."""
    if len(example.images) != example.num_images:
        raise ValueError(f"example ({example.task}) has {example.num_images} placeholders but carries "
                         f"{len(example.images)} images")
    groups, images = [], iter(example.images)
    for prompt, target in example.pairs:
        groups.append([next(images) for _ in range(prompt.count(placeholder) + target.count(placeholder))])
    return groups


def _call(processor, pairs, groups, return_loss_masks: bool, add_special_tokens: bool = True, add_eos=None) -> dict:
    """One processor call over ``pairs`` (one sample each), unpadded lists."""
    return processor(
        text=[p for p, _ in pairs], target=[t for _, t in pairs], image_ids=[list(g) for g in groups],
        add_special_tokens=add_special_tokens, add_eos=add_eos, padding=False, return_tensors=None,
        return_loss_masks=return_loss_masks,
    )
