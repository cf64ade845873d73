"""Generation that always yields well-formed image spans.

:class:`ImageSpanLogitsProcessor` plugs into plain ``model.generate`` and runs, per row and vectorised over the
batch, the span grammar of an :class:`~tokenizer_bridge.ImageVocab`: in text, image ids, ``<eol>`` and ``<eoi>`` are
forbidden; after ``<boi>`` (emitted by the model or ending the prompt) exactly one span follows -- ``h`` rows of ``w``
image ids each closed by ``<eol>``, then ``<eoi>`` (grid layout), or ``N`` image ids then ``<eoi>`` (sequence
layout). This is the constrained decoding used by token-based text+image models such as Chameleon
(arXiv:2405.09818) and Emu3 (arXiv:2409.18869). :func:`generate_images` wraps it for text-to-image prompts and
:func:`find_image_spans` locates spans in generated ids.

Example::

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
    >>> from tokenizer_bridge import ImageVocab
    >>> from mllm.generation import ImageSpanLogitsProcessor, find_image_spans
    >>> vocab = ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
    ...                    layout="grid", grid_size=(3, 4))
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=69, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, pad_token_id=0, eos_token_id=2))
    >>> prompt = torch.tensor([[1, 7, 9, vocab.boi_token_id]])  # a text-to-image prompt ends by opening a span
    >>> span_processor = ImageSpanLogitsProcessor(vocab, vocab_size=69, image_temperature=0.9)
    >>> out = model.generate(prompt, logits_processor=LogitsProcessorList([span_processor]), do_sample=True,
    ...                      max_new_tokens=vocab.span_length - 1)
    >>> start, end = find_image_spans(out[0], vocab)[0]
    >>> vocab.parse_span(out[0, start:end]).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import bisect
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tokenizer_bridge.image_vocab import ImageVocab

# What the next token of a row may be. Rows in text use TEXT (or TEXT_NO_IMAGE once they may not open an image);
# rows inside a span use the one category its grammar expects at that position.
TEXT, TEXT_NO_IMAGE, IMAGE, EOL, EOI = range(5)
_BOI = 5  # category of a <boi> token when checking prompts (never a "next token" category)


def _category_masks(vocab: ImageVocab, vocab_size: int) -> torch.Tensor:
    """``(5, vocab_size)`` bool: which token ids each next-token category allows."""
    is_image = vocab.is_image_token(torch.arange(vocab_size))
    allowed = torch.zeros(5, vocab_size, dtype=torch.bool)
    allowed[TEXT] = ~is_image
    allowed[TEXT, vocab.eoi_token_id] = False
    if vocab.eol_token_id is not None:
        allowed[TEXT, vocab.eol_token_id] = False
    allowed[TEXT_NO_IMAGE] = allowed[TEXT]
    allowed[TEXT_NO_IMAGE, vocab.boi_token_id] = False
    allowed[IMAGE] = is_image
    if vocab.eol_token_id is not None:
        allowed[EOL, vocab.eol_token_id] = True
    allowed[EOI, vocab.eoi_token_id] = True
    return allowed


def _span_categories(vocab: ImageVocab) -> torch.Tensor:
    """``(span_length - 1,)`` long: category of the token ``k`` positions after ``<boi>``."""
    body = vocab.span_length - 2
    categories = torch.full((body + 1,), IMAGE, dtype=torch.long)
    if vocab.layout == "grid":
        w = vocab.grid_size[1]
        categories[w :: w + 1] = EOL  # every row of w ids is closed by <eol>
    categories[body] = EOI
    return categories


def _token_categories(vocab: ImageVocab, vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` long: category of each token id (TEXT, IMAGE, EOL, EOI or _BOI); used to check prompts."""
    categories = torch.full((vocab_size,), TEXT, dtype=torch.long)
    categories[vocab.is_image_token(torch.arange(vocab_size))] = IMAGE
    if vocab.eol_token_id is not None:
        categories[vocab.eol_token_id] = EOL
    categories[vocab.eoi_token_id] = EOI
    categories[vocab.boi_token_id] = _BOI
    return categories


def _last_position(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of a ``(B, L)`` bool mask, -1 where there is none."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=1)


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Forces every image span to follow the :class:`ImageVocab` grammar; usable with plain ``model.generate``.

    Args:
        vocab: the image vocabulary of the bridged model.
        vocab_size: width of the model's logits (may exceed the tokenizer's length).
        allow_images_in_text: whether the model may open a ``<boi>`` by itself. Spans opened by the prompt are always
            completed.
        max_images: how many ``<boi>`` the model may emit by itself during one ``generate`` call (``None``: no limit).
        image_temperature: temperature applied only to rows whose next token is an image id. It is applied before
            ``generate``'s own ``temperature`` warper, so the two multiply (leave ``temperature`` at 1.0).
        image_top_k: keep only the ``k`` most likely image ids at image positions (``generate``'s ``top_k`` still
            applies to every row afterwards).

    State tracking: a row's state is a function of its last ``span_length - 1`` tokens only (a span is open iff its
    ``<boi>`` lies there with no ``<eoi>`` after it, and the distance to that ``<boi>`` is the position in the span),
    so every call recomputes it from that window with a handful of ``(B, span_length)`` tensor ops instead of
    updating per-row state from the last token. It is therefore exact whatever happens to the rows between calls --
    greedy, sampling, ``num_return_sequences`` and beam search (which reorders rows every step) alike -- costs about
    what an O(B) incremental update costs (small-tensor op overhead dominates), does not grow with the sequence
    length and never synchronises with the device. The only state kept across calls is where the prompt ends, to
    count ``max_images``: a new generation is recognised when the batch size changes or the length is not the
    previous one plus one, and its prompt is then checked once (a prompt ending inside a malformed span raises
    ``ValueError``). Call :meth:`reset` before reusing a processor for a prompt exactly one token longer than the
    last sequence it saw with the same batch size. Left padding is harmless unless the pad token is ``<boi>``.
    """

    def __init__(
        self,
        vocab: ImageVocab,
        vocab_size: int,
        *,
        allow_images_in_text: bool = True,
        max_images: Optional[int] = None,
        image_temperature: Optional[float] = None,
        image_top_k: Optional[int] = None,
    ):
        vocab.check_fits(vocab_size)
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        if image_temperature is not None and image_temperature <= 0:
            raise ValueError(f"image_temperature must be positive, got {image_temperature}")
        if image_top_k is not None and image_top_k < 1:
            raise ValueError(f"image_top_k must be >= 1, got {image_top_k}")
        self.vocab = vocab
        self.vocab_size = vocab_size
        self.allow_images_in_text = allow_images_in_text
        self.max_images = max_images
        self.image_temperature = image_temperature
        self.image_top_k = image_top_k
        self.allowed = _category_masks(vocab, vocab_size)  # (5, V)
        self.span_categories = _span_categories(vocab)  # (span_length - 1,)
        self.token_categories = _token_categories(vocab, vocab_size)  # (V,)
        self.positions = torch.arange(1, len(self.span_categories) + 1, dtype=torch.int32)  # (span_length - 1,)
        self.reset()

    def reset(self) -> None:
        """Forget the current generation; the next call treats its ``input_ids`` as a fresh prompt."""
        self._batch_size = self._length = self._prompt_length = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(
                f"scores have {scores.shape[-1]} columns but the processor was built for vocab_size={self.vocab_size}"
            )
        self._to(scores.device)
        if self._batch_size != input_ids.shape[0] or self._length is None or input_ids.shape[1] != self._length + 1:
            self._start(input_ids)
        self._length = input_ids.shape[1]
        categories = self.next_categories(input_ids)  # (B,)
        scores = scores.masked_fill(~self.allowed[categories], float("-inf"))
        return self._warp_image_rows(scores, categories == IMAGE)

    def next_categories(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """``(B,)`` category (``TEXT``, ``TEXT_NO_IMAGE``, ``IMAGE``, ``EOL`` or ``EOI``) of each row's next token."""
        window = input_ids[:, -len(self.span_categories) :]  # (B, W): an open span's <boi> lies in here
        # 1-based position of the last <boi>/<eoi> in the window (0: none); the span is open iff that token is <boi>
        boundary = (window == self.vocab.boi_token_id) | (window == self.vocab.eoi_token_id)
        last = (boundary * self.positions[: window.shape[1]]).amax(dim=1)  # (B,)
        last_token = window.gather(1, (last.long() - 1).clamp(min=0)[:, None]).squeeze(1)
        in_span = (last > 0) & (last_token == self.vocab.boi_token_id)
        offset = (window.shape[1] - last).clamp(max=len(self.span_categories) - 1)  # tokens since <boi>
        return torch.where(in_span, self.span_categories[offset], self._text_categories(input_ids))

    def _text_categories(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        batch = input_ids.shape[0]
        if not self.allow_images_in_text or self.max_images == 0:
            return torch.full((batch,), TEXT_NO_IMAGE, dtype=torch.long, device=input_ids.device)
        if self.max_images is None:
            return torch.full((batch,), TEXT, dtype=torch.long, device=input_ids.device)
        opened = (input_ids[:, self._prompt_length :] == self.vocab.boi_token_id).sum(dim=1)
        return torch.where(opened >= self.max_images, TEXT_NO_IMAGE, TEXT)

    def _warp_image_rows(self, scores: torch.FloatTensor, image_rows: torch.BoolTensor) -> torch.FloatTensor:
        """Image temperature and top-k on rows whose next token is an image id; other rows are returned unchanged."""
        if self.image_temperature is not None:
            temperature = torch.where(image_rows, self.image_temperature, 1.0).to(scores.dtype)  # (B,)
            scores = scores / temperature[:, None]
        if self.image_top_k is not None:
            k = min(self.image_top_k, scores.shape[-1])
            kth = scores.topk(k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(image_rows[:, None] & (scores < kth), float("-inf"))
        return scores

    def _start(self, input_ids: torch.LongTensor) -> None:
        self._check_prompt(input_ids)
        self._batch_size, self._prompt_length = input_ids.shape

    def _check_prompt(self, input_ids: torch.LongTensor) -> None:
        """Raise if a row ends inside a span whose tokens so far break the grammar (or that is already too long)."""
        last_boi = _last_position(input_ids == self.vocab.boi_token_id)  # (B,)
        open_span = last_boi > _last_position(input_ids == self.vocab.eoi_token_id)
        if not open_span.any():
            return
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        offset = positions - last_boi[:, None] - 1  # (B, L): position of each token inside the open span
        expected = self.span_categories[offset.clamp(0, len(self.span_categories) - 1)]
        actual = self.token_categories[input_ids.clamp(0, self.vocab_size - 1)]
        bad = open_span[:, None] & (offset >= 0) & (expected != actual)
        if bad.any():
            row, pos = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"prompt row {row} ends inside an image span that breaks the span grammar: token "
                f"{int(input_ids[row, pos])} at position {pos} is not what position {int(offset[row, pos])} of a "
                f"{self.vocab.layout} span holds"
            )

    def _to(self, device: torch.device) -> None:
        if self.allowed.device != device:
            self.allowed = self.allowed.to(device)
            self.span_categories = self.span_categories.to(device)
            self.token_categories = self.token_categories.to(device)
            self.positions = self.positions.to(device)


def find_image_spans(input_ids: torch.Tensor, vocab: ImageVocab) -> list[tuple[int, int]]:
    """``(start, end)`` of each image span of a 1-D id sequence, so that ``input_ids[start:end]`` is the span.

    A span runs from a ``<boi>`` to the first ``<eoi>`` after it. One cut short -- by the next ``<boi>`` or by the end
    of the sequence -- is returned up to that point, so that :meth:`ImageVocab.parse_span` reports it.
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 1:
        raise ValueError(f"find_image_spans takes one sequence (1-D ids), got shape {tuple(input_ids.shape)}")
    boi_positions = (input_ids == vocab.boi_token_id).nonzero().flatten().tolist()
    eoi_positions = (input_ids == vocab.eoi_token_id).nonzero().flatten().tolist()
    spans = []
    for i, start in enumerate(boi_positions):
        limit = boi_positions[i + 1] if i + 1 < len(boi_positions) else len(input_ids)
        j = bisect.bisect_right(eoi_positions, start)
        end = eoi_positions[j] + 1 if j < len(eoi_positions) and eoi_positions[j] < limit else limit
        spans.append((start, end))
    return spans


def generate_images(
    model,
    tokenizer,
    vocab: ImageVocab,
    prompts: Sequence[str],
    *,
    image_temperature: Optional[float] = None,
    image_top_k: Optional[int] = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """Generate one image per prompt (per returned sequence) and return its image ids.

    Each prompt is written as ``text <boi>`` (batch left-padded with the tokenizer's pad token) and exactly one span is
    generated. Returns ``(B, h, w)`` image ids for the grid layout or ``(B, N)`` for the sequence layout, where ``B``
    is ``len(prompts) * num_return_sequences``. ``generate_kwargs`` go to ``model.generate`` (``do_sample``,
    ``num_return_sequences``, a ``logits_processor`` list, ...); the span length fixes ``max_new_tokens``.
    """
    if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
        raise TypeError("generate_images sets max_new_tokens itself (one image span); do not pass max_new_tokens")
    input_ids, attention_mask = _text_to_image_prompts(tokenizer, vocab, prompts)
    span_processor = ImageSpanLogitsProcessor(
        vocab, _logits_width(model), image_temperature=image_temperature, image_top_k=image_top_k
    )
    user_processors = generate_kwargs.pop("logits_processor", None) or []
    logits_processor = LogitsProcessorList([*user_processors, span_processor])
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        logits_processor=logits_processor,
        max_new_tokens=vocab.span_length - 1,
        **generate_kwargs,
    )
    sequences = output.sequences if hasattr(output, "sequences") else output
    spans = sequences[:, input_ids.shape[1] - 1 :].cpu()  # (B, span_length): <boi> + generated tokens
    return torch.stack([vocab.parse_span(span) for span in spans])


def _text_to_image_prompts(tokenizer, vocab: ImageVocab, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``text <boi>`` ids and attention mask, each ``(B, P)``."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token) first")
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side
    boi = torch.full((len(prompts), 1), vocab.boi_token_id, dtype=torch.long)
    input_ids = torch.cat([encoded["input_ids"], boi], dim=1)
    attention_mask = torch.cat([encoded["attention_mask"], torch.ones_like(boi)], dim=1)
    return input_ids, attention_mask


def _logits_width(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        return head.out_features
    return model.config.get_text_config().vocab_size
