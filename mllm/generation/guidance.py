"""Classifier-free guidance and nucleus sampling that act only inside image spans.

:class:`ImageCFGLogitsProcessor` is classifier-free guidance (Ho & Salimans, arXiv:2207.12598) as token-based
text-to-image models apply it (Make-A-Scene arXiv:2203.13131, Parti arXiv:2206.10789, LlamaGen arXiv:2406.06525):
next to every sequence it keeps an *unconditional* twin -- the prompt the recipe's prompt dropout trains
(:func:`~mllm.data.tasks.t2i_prompt` ``(None)``, i.e. ``"draw:"``) followed by the same generated tokens -- runs the
model on it with its own KV cache (one forward per step, on the last token), and for rows whose next token lies inside
an image span replaces the log-probabilities with ``uncond + scale * (cond - uncond)``. Rows in text are returned
untouched, so captions or chat around the image are never guided. It is a plain ``LogitsProcessor``: it works with
``model.generate`` (greedy or sampling, batches, left padding, ``num_return_sequences``; not beam search, which
reorders rows behind its back).

:class:`ImageTopPLogitsWarper` is nucleus sampling (Holtzman et al., arXiv:1904.09751) restricted to image rows, the
third knob next to :class:`~mllm.generation.logits.ImageSpanLogitsProcessor`'s ``image_temperature`` / ``image_top_k``.

Order in the processor list: guidance first (it needs the model's raw logits, and the span processor's image
temperature / top-k should shape the *guided* distribution), then the span processor, then image top-p (the nucleus
must be taken over the ids the grammar allows)::

    LogitsProcessorList([ImageCFGLogitsProcessor(...), ImageSpanLogitsProcessor(...), ImageTopPLogitsWarper(...)])

:func:`guided_generate_image_ids` builds that list for text-to-image prompts. By default (``cfg_batched=True``) it
does not run the twin from inside a processor but decodes both halves as one ``2B``-row batch per step, the way
LlamaGen and Janus do (:mod:`mllm.generation.guidance_batched`); ``cfg_batched=False`` keeps the processor above.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from tokenizer_bridge.vocab.image_vocab import ImageVocab

from ..data.tasks import t2i_prompt
from .guidance_batched import cache_kwarg, check_kwargs, generate_with_batched_guidance
from .inference import _check_captions, _logits_width, _prompt_batch, default_image_size
from .logits import TEXT, TEXT_NO_IMAGE, ImageSpanLogitsProcessor, find_image_spans

SpanSource = Union[ImageVocab, ImageSpanLogitsProcessor]


class _SpanRows:
    """Which rows of a batch are inside an image span, read from an :class:`ImageSpanLogitsProcessor`'s grammar.

    Built from an :class:`ImageVocab` (the grammar object is made on first use, when the logits width is known), a
    span processor, or anything holding an ``image_vocab`` (a :class:`UnifiedProcessor`).
    """

    def __init__(self, source):
        if isinstance(source, ImageSpanLogitsProcessor):
            self.grammar, self.vocab = source, source.vocab
        else:
            self.grammar, self.vocab = None, getattr(source, "image_vocab", source)
            if not isinstance(self.vocab, ImageVocab):
                raise TypeError(f"expected an ImageVocab, an ImageSpanLogitsProcessor or a processor with an "
                                f"image_vocab, got {type(source).__name__}")

    def __call__(self, input_ids: torch.LongTensor, vocab_size: int) -> torch.BoolTensor:
        """``(B,)`` True where the row's next token belongs to an image span (image id, ``<eol>``, ``<eoi>``...)."""
        if self.grammar is None:
            self.grammar = ImageSpanLogitsProcessor(self.vocab, vocab_size)
        self.grammar._to(input_ids.device)
        categories = self.grammar.next_categories(input_ids)
        return (categories != TEXT) & (categories != TEXT_NO_IMAGE)


class ImageCFGLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance on the rows inside image spans, with an incrementally decoded unconditional branch.

    Args:
        model: the causal LM being generated from (its forward must take ``past_key_values`` / ``position_ids``).
        vocab: the :class:`ImageVocab` (or the :class:`ImageSpanLogitsProcessor` of the same call) that tells which
            rows are inside a span.
        uncond_input_ids: ``(B0, P0)`` unconditional prompt(s), left-padded, ending where the conditional prompts end
            (``<boi>`` for text-to-image). ``B0`` is 1 (shared by every row) or divides the batch (``B = B0 * n`` with
            ``num_return_sequences=n``).
        guidance_scale: ``s`` in ``uncond + s * (cond - uncond)`` (on log-softmax); 1 is no guidance, 0 is the
            unconditional model. Must be finite (``ValueError`` for NaN and infinities).
        uncond_attention_mask: ``(B0, P0)`` mask of ``uncond_input_ids`` (default: no padding).

    The first call of a generation (recognised as :class:`ImageSpanLogitsProcessor` does: the batch size changes or
    the length is not the previous one plus one; :meth:`reset` forces it) runs the unconditional prompts; every later
    call feeds the tokens appended since, so the branch costs one single-token forward per step.
    """

    def __init__(self, model, vocab: SpanSource, uncond_input_ids: torch.LongTensor, guidance_scale: float,
                 uncond_attention_mask: Optional[torch.Tensor] = None):
        uncond_input_ids = torch.as_tensor(uncond_input_ids).long()
        if uncond_input_ids.dim() != 2 or uncond_input_ids.shape[1] == 0:
            raise ValueError(f"uncond_input_ids must be (B0, P0) with P0 > 0, got {tuple(uncond_input_ids.shape)}")
        if uncond_attention_mask is None:
            uncond_attention_mask = torch.ones_like(uncond_input_ids)
        if uncond_attention_mask.shape != uncond_input_ids.shape:
            raise ValueError("uncond_attention_mask must have the shape of uncond_input_ids")
        self.model, self.guidance_scale, self.rows = model, check_guidance_scale(guidance_scale), _SpanRows(vocab)
        self.uncond_input_ids, self.uncond_attention_mask = uncond_input_ids, uncond_attention_mask.long()
        self._keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_kwarg(model)
        self.reset()

    def reset(self) -> None:
        """Forget the current generation; the next call treats its ``input_ids`` as a fresh prompt."""
        self._cache = self._mask = self._logits = self._length = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._length is None or self._mask.shape[0] != input_ids.shape[0] or input_ids.shape[1] != self._length + 1:
            self._start(input_ids)
        else:
            self._step(input_ids[:, -1:])
        self._length = input_ids.shape[1]
        in_span = self.rows(input_ids, scores.shape[-1])  # (B,)
        return torch.where(in_span[:, None], self.guide(scores, self._logits), scores)

    def guide(self, cond: torch.FloatTensor, uncond: torch.FloatTensor) -> torch.FloatTensor:
        """:func:`guide` at this processor's scale."""
        return guide(cond, uncond, self.guidance_scale)

    def _start(self, input_ids: torch.LongTensor) -> None:
        """Run the unconditional prompts (repeated to the batch) into a fresh cache."""
        batch, prompts = input_ids.shape[0], self.uncond_input_ids.shape[0]
        if batch % prompts:
            raise ValueError(f"{prompts} unconditional prompts cannot be spread over a batch of {batch} rows")
        ids = self.uncond_input_ids.to(input_ids.device).repeat_interleave(batch // prompts, dim=0)  # (B, P0)
        mask = self.uncond_attention_mask.to(input_ids.device).repeat_interleave(batch // prompts, dim=0)
        self._cache, self._mask = DynamicCache(config=self.model.config), mask[:, :0]
        self._forward(ids, mask)

    def _step(self, new_ids: torch.LongTensor) -> None:
        self._forward(new_ids, torch.ones_like(new_ids))

    @torch.no_grad()
    def _forward(self, ids: torch.LongTensor, new_mask: torch.Tensor) -> None:
        """Feed ``ids`` ``(B, k)`` after what the cache holds; keep the last position's logits ``(B, V)``."""
        self._mask = torch.cat([self._mask, new_mask], dim=1)
        # positions as generate() makes them: count of real tokens so far, pads at 0
        positions = (self._mask.cumsum(dim=1) - 1).masked_fill(self._mask == 0, 0)[:, -ids.shape[1]:]
        extra = {"logits_to_keep": 1} if self._keeps_last else {}
        extra[self._cache_kwarg] = self._cache
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions, use_cache=True, **extra)
        self._logits = out.logits[:, -1]


def guide(cond: torch.FloatTensor, uncond: torch.FloatTensor, guidance_scale: float) -> torch.FloatTensor:
    """``uncond + scale * (cond - uncond)`` on log-softmax, ``(B, V)``; ids the conditional scores ruled out
    (``-inf``) stay out. ``lerp`` returns exactly ``uncond`` at scale 0 and exactly ``cond`` at scale 1."""
    cond_logp = cond.float().log_softmax(dim=-1)
    uncond_logp = uncond.float().log_softmax(dim=-1)
    guided = torch.lerp(uncond_logp, cond_logp, guidance_scale)
    return guided.masked_fill(cond_logp == float("-inf"), float("-inf")).to(cond.dtype)


class _StepGuidance(LogitsProcessor):
    """The guidance of the batched path: the unconditional logits come from the same forward as the conditional ones
    (:func:`~mllm.generation.guidance_batched.generate_with_batched_guidance` hands them over every step)."""

    def __init__(self, vocab: SpanSource, guidance_scale: float):
        self.rows, self.guidance_scale, self._uncond = _SpanRows(vocab), check_guidance_scale(guidance_scale), None

    def set_unconditional(self, logits: torch.FloatTensor) -> None:
        self._uncond = logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._uncond is None or self._uncond.shape != scores.shape:
            raise RuntimeError("batched guidance was called without the unconditional logits of this step")
        in_span = self.rows(input_ids, scores.shape[-1])  # (B,)
        return torch.where(in_span[:, None], guide(scores, self._uncond, self.guidance_scale), scores)


def check_guidance_scale(guidance_scale) -> float:
    """The guidance scale as a float; ``ValueError`` unless it is a finite number (a NaN scale would turn every
    guided row into NaN and greedy search into token 0; an infinite one into NaN where cond == uncond)."""
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return scale


def _check_guided_settings(model, generate_kwargs: dict) -> None:
    """Refuse the ``generate`` settings guidance cannot follow: beam search reorders rows behind the unconditional
    branch's cache, and the span length fixes ``max_new_tokens``."""
    beams = generate_kwargs.get("num_beams", getattr(getattr(model, "generation_config", None), "num_beams", 1))
    if beams is not None and int(beams) > 1:
        raise ValueError(f"classifier-free guidance does not work with beam search (num_beams={beams}): beams "
                         "reorder rows, and each row's unconditional twin would no longer follow it; use num_beams=1")
    if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
        raise TypeError("guided_generate_image_ids sets max_new_tokens itself (one image span); do not pass "
                        "max_new_tokens or max_length")


class ImageTopPLogitsWarper(LogitsProcessor):
    """Nucleus (top-p) filtering applied only to rows whose next token lies inside an image span.

    Keeps, in each such row, the most likely ids until their probability reaches ``top_p`` (at least
    ``min_tokens_to_keep``); text rows are returned unchanged. Put it *after* the span processor, so the nucleus is
    taken over the ids the span grammar allows (rows that may only close a row or the span keep their one id).

    Args:
        vocab_or_processor: an :class:`ImageVocab`, the call's :class:`ImageSpanLogitsProcessor`, or a processor with
            an ``image_vocab``.
        top_p: probability mass to keep, in ``(0, 1]``.
    """

    def __init__(self, vocab_or_processor, top_p: float, min_tokens_to_keep: int = 1):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep}")
        self.rows, self.top_p, self.min_tokens_to_keep = _SpanRows(vocab_or_processor), top_p, min_tokens_to_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        in_span = self.rows(input_ids, scores.shape[-1])  # (B,)
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_scores.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely ids
        drop_sorted = mass_before >= self.top_p
        drop_sorted[:, : self.min_tokens_to_keep] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(in_span[:, None] & drop, float("-inf"))


@torch.no_grad()
def guided_generate_image_ids(
    model,
    processor,
    captions: Sequence[Optional[str]],
    guidance_scale: float,
    do_sample: bool = False,
    image_temperature: Optional[float] = None,
    image_top_k: Optional[int] = None,
    image_top_p: Optional[float] = None,
    cfg_batched: bool = True,
    **generate_kwargs,
) -> torch.LongTensor:
    """Captions -> image ids of one generated image each (as :func:`mllm.generation.inference.generate_image_ids`), with
    classifier-free guidance against the unconditional prompt ``t2i_prompt(None)`` and optional image-only sampling
    settings. For a sequence with token budgets the model chooses each span's budget (guided like the ids) and a list
    of ``(b_i[, L])`` tensors is returned. A variable-size grid generates at
    :func:`mllm.generation.inference.default_image_size` (both prompts end ``<boi> <h_k> <w_k>``).

    ``cfg_batched=True`` (the default) runs the conditional and the unconditional halves as one ``2B``-row forward per
    step (:func:`~mllm.generation.guidance_batched.generate_with_batched_guidance`): one pass over the weights and
    larger matrix products per step, usually the faster path, but its peak memory is that of a ``2B``-row forward
    (prefill activations, one cache of ``2B`` rows that grows as one tensor) and both halves are padded to the longer
    prompt; ``generate_kwargs`` may only be the few settings it honours (``num_return_sequences``, ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``cache_implementation="static"``, ...; others raise ``TypeError`` /
    ``ValueError``). ``cfg_batched=False`` keeps the unbatched path: plain ``model.generate`` with
    :class:`ImageCFGLogitsProcessor`, whose twin runs as a second ``B``-row forward with its own cache -- a lower
    peak for memory-bound cases, and every ``generate`` setting but beam search. Both give the same images to float
    tolerance (greedy: the same ids; sampling: the same ids for the same ``torch.manual_seed``)."""
    vocab = processor.image_vocab
    check_guidance_scale(guidance_scale)
    _check_guided_settings(model, generate_kwargs)
    if cfg_batched:  # before the call: a logits_processor= of the caller would clash with the loop's own argument
        check_kwargs(generate_kwargs)
    _check_captions(captions)
    input_ids, attention_mask = _prompt_batch(processor, [t2i_prompt(c) for c in captions], append_boi=True)
    uncond_ids, uncond_mask = _prompt_batch(processor, [t2i_prompt(None)], append_boi=True)
    size = default_image_size(vocab) if getattr(vocab, "variable_size", False) else None
    if size is not None:  # the size tokens follow <boi> in both branches
        sizes = torch.tensor([vocab.size_tokens(*size)])
        input_ids = torch.cat([input_ids, sizes.expand(len(input_ids), -1)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones(len(input_ids), 2, dtype=attention_mask.dtype)], dim=1)
        uncond_ids = torch.cat([uncond_ids, sizes.expand(len(uncond_ids), -1)], dim=1)
        uncond_mask = torch.cat([uncond_mask, torch.ones(len(uncond_ids), 2, dtype=uncond_mask.dtype)], dim=1)
    head = 1 if size is None else 3  # <boi> (+ <h_k> <w_k>)
    span = ImageSpanLogitsProcessor(vocab, _logits_width(model), image_temperature=image_temperature,
                                    image_top_k=image_top_k)
    if cfg_batched:
        guidance = _StepGuidance(span, guidance_scale)
    else:
        guidance = ImageCFGLogitsProcessor(model, span, uncond_ids, guidance_scale, uncond_mask)
    processors = [guidance, span]
    if image_top_p is not None:
        processors.append(ImageTopPLogitsWarper(span, image_top_p))
    common = dict(max_new_tokens=(vocab.span_length if size is None else vocab.span_length_of(*size)) - head,
                  do_sample=do_sample, pad_token_id=processor.tokenizer.pad_token_id)
    if cfg_batched:
        prompt_length = input_ids.shape[1]

        def every_span_closed(sequences: torch.LongTensor) -> bool:  # budgeted spans may close before the longest
            return bool((sequences[:, prompt_length:] == vocab.eoi_token_id).any(dim=1).all())

        out = generate_with_batched_guidance(model, input_ids, attention_mask, uncond_ids, uncond_mask, guidance,
                                             LogitsProcessorList(processors), done=every_span_closed, **common,
                                             **generate_kwargs)
    else:
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             logits_processor=LogitsProcessorList(processors), **common, **generate_kwargs)
    spans = out[:, input_ids.shape[1] - head :].cpu()  # (B, span_length): <boi> (+ sizes) + generated
    if vocab.has_budgets:  # each row's span has the token budget the model chose: a list, each cut at its <eoi>
        return [vocab.parse_span(row[slice(*find_image_spans(row, vocab)[0])]) for row in spans]
    return torch.stack([vocab.parse_span(span) for span in spans])
