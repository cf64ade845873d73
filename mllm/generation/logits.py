"""Generation that always yields well-formed image spans.

:class:`ImageSpanLogitsProcessor` plugs into plain ``model.generate`` and runs, per row and vectorised over the
batch, the span grammar of an :class:`~tokenizer_bridge.ImageVocab`: in text, image-only tokens, ``<eol>``, ``<eoi>``
and size tokens are forbidden; after ``<boi>`` (emitted by the model or ending the prompt) exactly one span follows,
token by token what the vocabulary's layout prescribes -- grid rows closed by ``<eol>``, residual levels in
position- or level-major order, each image token restricted to its own id range (per level, per factorized sub-token, or
the unified-codebook table), and, for variable-size grids, the size tokens ``<h_k> <w_k>`` the model picks first,
which then fix the rest of that row's span; for sequences with token budgets (HOOK-style slot tokenizers), likewise
the budget token ``<n_b>`` -- chosen by the model among the allowed budgets, or forced by the caller -- after which
exactly ``b`` positions of ``L`` levels and ``<eoi>`` follow. This is the constrained decoding used by token-based
text+image models such as Chameleon (arXiv:2405.09818) and Emu3 (arXiv:2409.18869). :func:`generate_images` wraps it
for text-to-image prompts and :func:`find_image_spans` locates spans in generated ids.

Example::

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
    >>> from tokenizer_bridge import ImageVocab
    >>> from mllm.generation.logits import ImageSpanLogitsProcessor, find_image_spans
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
import numbers
from typing import Optional, Sequence, Union

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tokenizer_bridge.vocab import (
    CLASS_EOI,
    CLASS_EOL,
    CLASS_HEIGHT,
    CLASS_IMAGE,
    CLASS_WIDTH,
    ImageVocab,
)

# What the next token of a row may be (``next_categories``). Rows in text use TEXT (or TEXT_NO_IMAGE once they may
# not open an image); rows inside a span use the category its grammar expects there: IMAGE for any image id (of any
# level / sub-token range), EOL, EOI, or SIZE for the size tokens of a variable-size grid and the budget token of a
# budgeted sequence (which is of token class CLASS_WIDTH: a budgeted sequence is a 1 x budget image).
TEXT, TEXT_NO_IMAGE, IMAGE, EOL, EOI, SIZE = range(6)
# Internally a row's *state* is finer: 0 TEXT, 1 TEXT_NO_IMAGE, then 2 + the token class the span grammar expects
# (CLASS_EOI, CLASS_EOL, CLASS_HEIGHT, CLASS_WIDTH, CLASS_IMAGE + image class), each state with its own allowed-token
# mask.
_SPAN = 2
_CLASS_CATEGORY = {CLASS_EOI: EOI, CLASS_EOL: EOL, CLASS_HEIGHT: SIZE, CLASS_WIDTH: SIZE}
# Generation settings that ban tokens before the span processor sees the scores (transformers applies them first).
CONFLICTING_SETTINGS = "no_repeat_ngram_size, bad_words_ids, suppress_tokens, begin_suppress_tokens or sequence_bias"
# Variable-size grids get a (H*W, window) state table when it has at most this many entries (int16: 8 MB); larger
# ones compute the state from the row's size with a few more integer ops per step.
MAX_SIZE_TABLE = 1 << 22


def _state_masks(vocab: ImageVocab, vocab_size: int, budgets: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``(S, vocab_size)`` bool: which token ids each state allows (S = 2 + CLASS_IMAGE + image classes); ``budgets``
    restricts the budget tokens a span may open with (default: every budget of the vocabulary)."""
    ids = torch.arange(vocab_size)
    allowed = torch.zeros(_SPAN + CLASS_IMAGE + vocab.num_image_classes, vocab_size, dtype=torch.bool)
    allowed[_SPAN + CLASS_IMAGE :] = vocab.class_token_mask(vocab_size)
    allowed[_SPAN + CLASS_EOI, vocab.eoi_token_id] = True
    if vocab.eol_token_id is not None:
        allowed[_SPAN + CLASS_EOL, vocab.eol_token_id] = True
    if vocab.variable_size:
        sizes = torch.tensor(vocab.size_token_ids)
        height = sizes[: vocab.grid_size[0]]
        allowed[_SPAN + CLASS_HEIGHT, height] = True
        allowed[_SPAN + CLASS_WIDTH, sizes[vocab.grid_size[0] :]] = True
    in_span_only = allowed[_SPAN + CLASS_EOI] | allowed[_SPAN + CLASS_EOL] | allowed[_SPAN + CLASS_HEIGHT]
    in_span_only |= allowed[_SPAN + CLASS_WIDTH]
    if vocab.has_budgets:
        in_span_only[vocab.budget_token_ids] = True  # every budget token, also those the caller does not allow
        allowed[_SPAN + CLASS_WIDTH, [vocab.budget_token(b) for b in (budgets or vocab.budgets)]] = True
    if not vocab.is_unified:  # unified-codebook image ids are text tokens too
        in_span_only |= vocab.is_image_token(ids)
    allowed[TEXT] = ~in_span_only
    allowed[TEXT_NO_IMAGE] = allowed[TEXT]
    allowed[TEXT_NO_IMAGE, vocab.boi_token_id] = False
    return allowed


def _state_categories(vocab: ImageVocab) -> torch.Tensor:
    """``(S,)`` long: the public category of each state."""
    classes = [_CLASS_CATEGORY.get(c, IMAGE) for c in range(CLASS_IMAGE + vocab.num_image_classes)]
    return torch.tensor([TEXT, TEXT_NO_IMAGE] + classes)


def _size_states(vocab: ImageVocab, window: int) -> Optional[torch.Tensor]:
    """``(H*W, window)`` int16 state of the token ``t`` after ``<boi>`` of an ``h x w`` span (row ``(h-1)*W + w-1``),
    or ``None`` for fixed layouts and for tables above ``MAX_SIZE_TABLE`` entries. A budgeted sequence gets
    ``(len(budgets), window)``: row ``i`` is the span of budget ``budgets[i]`` (never more entries than
    ``budgets x span length``)."""
    if vocab.has_budgets:
        budgets = torch.tensor(vocab.budgets)[:, None]  # (nb, 1)
        return (_SPAN + vocab.span_token_classes(torch.arange(window)[None, :], 1, budgets)).to(torch.int16)
    if not vocab.variable_size or vocab.grid_size[0] * vocab.grid_size[1] * window > MAX_SIZE_TABLE:
        return None
    height, width = vocab.grid_size
    h = torch.arange(1, height + 1).repeat_interleave(width)[:, None]  # (H*W, 1)
    w = torch.arange(1, width + 1).repeat(height)[:, None]  # (H*W, 1)
    return (_SPAN + vocab.span_token_classes(torch.arange(window)[None, :], h, w)).to(torch.int16)


def _allowed_budgets(vocab: ImageVocab, budget) -> Optional[list[int]]:
    """The budgets a caller allows (``None``: every budget of the vocabulary), checked against ``vocab.budgets``."""
    if budget is None:
        return None
    if not vocab.has_budgets:
        raise ValueError("budget= needs an ImageVocab with token budgets (a sequence layout bridged with budgets=); "
                         "this vocabulary's spans have a fixed length")
    chosen = [budget] if isinstance(budget, numbers.Integral) else list(budget)
    unknown = [b for b in chosen if int(b) not in vocab.budgets]
    if not chosen or unknown:
        raise ValueError(f"budget {budget} is not among this vocabulary's token budgets {vocab.budgets}")
    return sorted({int(b) for b in chosen})


def _last_position(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of a ``(B, L)`` bool mask, -1 where there is none."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=1)


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Forces every image span to follow the :class:`ImageVocab` grammar; usable with plain ``model.generate``.

    Args:
        vocab: the image vocabulary of the bridged model (any layout).
        vocab_size: width of the model's logits (may exceed the tokenizer's length).
        allow_images_in_text: whether the model may open a ``<boi>`` by itself. Spans opened by the prompt are always
            completed.
        max_images: how many ``<boi>`` the model may emit by itself during one ``generate`` call (``None``: no limit).
        image_temperature: temperature applied only to rows whose next token is an image id. It is applied before
            ``generate``'s own ``temperature`` warper, so the two multiply (leave ``temperature`` at 1.0).
        image_top_k: keep only the ``k`` most likely image ids at image positions (``generate``'s ``top_k`` still
            applies to every row afterwards).
        budget: for a vocabulary with token budgets: the budget (or list of budgets) spans may open with; default:
            any of ``vocab.budgets``, chosen by the model. Spans that a prompt opened with a budget token are
            checked against it.

    State tracking: a row's state is a function of its last ``span_length - 1`` tokens only (a span is open iff its
    ``<boi>`` lies there with no ``<eoi>`` after it, the distance to that ``<boi>`` is the position in the span, and
    for variable-size grids the two tokens after it give the row's own size, for budgeted sequences the one budget
    token), so every call recomputes it from that window with a handful of ``(B, span_length)`` tensor ops -- a
    precomputed per-position state table for fixed layouts, a few ``(B,)`` integer ops on the size (budget) tokens
    for variable grids (budgeted sequences) -- instead of updating per-row state
    from the last token. It is therefore exact whatever happens to the rows between calls -- greedy, sampling,
    ``num_return_sequences`` and beam search (which reorders rows every step) alike -- has no Python loop over the
    batch and does not grow with the sequence length. Its one device synchronisation per step is the check that no
    row inside a span is left without a token: when another setting (``no_repeat_ngram_size``, ``bad_words_ids``,
    ...) banned every token the grammar allows, it raises ``ValueError`` naming those settings, rather than re-allow
    a token behind the caller's back or let greedy search emit token 0 into the span. The only state kept across
    calls is where the prompt ends, to count ``max_images``: a new generation is recognised when the batch size
    changes or the length is not the previous one plus one, and its prompt is then checked once (a prompt ending
    inside a malformed span raises ``ValueError``). Call :meth:`reset` before reusing a processor for a prompt
    exactly one token longer than the last sequence it saw with the same batch size. Left padding is harmless unless
    the pad token is ``<boi>``.
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
        budget: Optional[Union[int, Sequence[int]]] = None,
    ):
        vocab.check_fits(vocab_size)
        budgets = _allowed_budgets(vocab, budget)
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
        self.window = vocab.span_length - 1  # tokens after <boi> in the longest span
        self.budgets = budgets
        self.allowed = _state_masks(vocab, vocab_size, budgets)  # (S, V)
        self.blocked = ~self.allowed  # (S, V)
        self.categories = _state_categories(vocab)  # (S,)
        self.image_states = self.categories == IMAGE  # (S,)
        # (window,) state of the token t after <boi>; only valid for fixed sizes (variable grids compute it per row)
        self.span_states = _SPAN + vocab.span_token_classes(torch.arange(self.window))
        self.size_states = _size_states(vocab, self.window)  # (H*W, window) int16 or None
        if vocab.variable_size:  # where <h_k> / <w_k> sit after <boi>, their first ids, largest values, row strides
            height, width = vocab.grid_size
            self.size_steps = torch.tensor([[0, 1]])
            self.size_bases = torch.tensor([[vocab.size_token_offset, vocab.size_token_offset + height]])
            self.size_limits = torch.tensor([[height - 1, width - 1]])
            self.size_strides = torch.tensor([[width, 1]])
        elif vocab.has_budgets:  # one <n_b> after <boi>: its index among the budgets is the row of size_states
            self.size_steps, self.size_strides = torch.tensor([[0]]), torch.tensor([[1]])
            self.size_bases = torch.tensor([[vocab.budget_token_offset]])
            self.size_limits = torch.tensor([[len(vocab.budgets) - 1]])
        self.positions = torch.arange(1, self.window + 1)  # (window,)
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
        states = self.next_states(input_ids)  # (B,)
        scores = scores.masked_fill(self.blocked[states], float("-inf"))
        self._check_not_all_masked(scores, states)
        return self._warp_image_rows(scores, self.image_states[states])

    def _check_not_all_masked(self, scores: torch.FloatTensor, states: torch.LongTensor) -> None:
        """Raise when a row inside a span has no token left: a logits processor before this one (a generation
        setting) banned every token the grammar allows there. Greedy search would then emit token 0 and sampling
        fail, so the conflict is named instead of letting a malformed span through. (The one device sync per step.)"""
        dead = (states >= _SPAN) & torch.isneginf(scores).all(dim=-1)
        if not bool(dead.any()):
            return
        row = int(dead.nonzero()[0])
        allowed = self.allowed[states[row]].nonzero().flatten()
        shown = ", ".join(str(int(t)) for t in allowed[:4]) + (", ..." if allowed.numel() > 4 else "")
        raise ValueError(
            f"row {row}: every token the image-span grammar allows next (token ids {shown}) was banned by another "
            f"constraint of this generation -- {CONFLICTING_SETTINGS} or a logits processor placed before "
            "ImageSpanLogitsProcessor; image spans repeat tokens (<eol> closes every row), so leave these unset "
            "while generating images"
        )

    def next_categories(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """``(B,)`` category (``TEXT``, ``TEXT_NO_IMAGE``, ``IMAGE``, ``EOL``, ``EOI`` or ``SIZE``) of each row's
        next token. A row is inside an image span iff its category is not ``TEXT``/``TEXT_NO_IMAGE``."""
        states = self.next_states(input_ids)
        return self.categories[states]

    def in_image_span(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """``(B,)`` whether each row's next token lies inside an image span (after ``<boi>``, up to ``<eoi>``)."""
        return self.next_states(input_ids) >= _SPAN

    def next_states(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """``(B,)`` fine state of each row's next token: a row index of ``self.allowed``."""
        self._to(input_ids.device)
        window = input_ids[:, -self.window :]  # (B, W): an open span's <boi> lies in here
        width = window.shape[1]
        # 1-based position of the last <boi>/<eoi> in the window (0: none); the span is open iff that token is <boi>
        boundary = (window == self.vocab.boi_token_id) | (window == self.vocab.eoi_token_id)
        last = (boundary * self.positions[:width]).amax(dim=1)  # (B,)
        last_token = window.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1)
        in_span = (last > 0) & (last_token == self.vocab.boi_token_id)
        offset = width - last  # (B,): index of the next token after <boi>
        if self.size_states is not None:
            sizes = window.gather(1, (last[:, None] + self.size_steps).clamp(max=width - 1))  # (B, 2) <h_k>, <w_k>
            sizes = (sizes - self.size_bases).clamp(min=0).minimum(self.size_limits)  # (B, 2): h - 1, w - 1
            pair = (sizes * self.size_strides).sum(dim=1)  # (B,): row of size_states
            span_states = self.size_states[pair, offset.clamp(max=self.window - 1)].long()
        elif self.vocab.variable_size:
            h, w = self._row_sizes(window, last)
            span_states = _SPAN + self.vocab.span_token_classes(offset, h, w)
        else:
            span_states = self.span_states[offset.clamp(max=self.window - 1)]
        return torch.where(in_span, span_states, self._text_states(input_ids))

    def _row_sizes(self, tokens: torch.LongTensor, boi_end: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, w)`` of each row's span from the two tokens after its ``<boi>`` (``boi_end`` = index after it),
        clamped into range (not yet emitted or invalid sizes are never read: those positions hold size tokens). A
        budgeted sequence reads its one budget token: ``(1, budget)`` (the largest budget where it is invalid)."""
        last = tokens.shape[1] - 1
        if self.vocab.has_budgets:
            budget = self.vocab.budget_of_tokens(tokens.gather(1, boi_end.clamp(max=last)[:, None]).squeeze(1))
            return torch.ones_like(budget), torch.where(budget > 0, budget, self.vocab.num_tokens)
        height = tokens.gather(1, boi_end.clamp(max=last)[:, None]).squeeze(1)
        width = tokens.gather(1, (boi_end + 1).clamp(max=last)[:, None]).squeeze(1)
        h, w = self.vocab.size_of_tokens(height, width)
        return h.clamp(1, self.vocab.grid_size[0]), w.clamp(1, self.vocab.grid_size[1])

    def _text_states(self, input_ids: torch.LongTensor) -> torch.LongTensor:
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
        h = w = None
        if self.vocab.variable_size or self.vocab.has_budgets:
            h, w = self._row_sizes(input_ids, last_boi + 1)
            h, w = h[:, None], w[:, None]
        expected = _SPAN + self.vocab.span_token_classes(offset.clamp(min=0), h, w)  # (B, L)
        ok = self.allowed[expected, input_ids.clamp(0, self.vocab_size - 1)]
        bad = open_span[:, None] & (offset >= 0) & ~ok
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
            self.blocked = self.blocked.to(device)
            self.categories = self.categories.to(device)
            self.image_states = self.image_states.to(device)
            self.span_states = self.span_states.to(device)
            if self.size_states is not None:
                for name in ("size_states", "size_steps", "size_bases", "size_limits", "size_strides"):
                    setattr(self, name, getattr(self, name).to(device))
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
    image_size: Optional[Sequence[int]] = None,
    budget: Optional[int] = None,
    image_temperature: Optional[float] = None,
    image_top_k: Optional[int] = None,
    **generate_kwargs,
) -> Union[torch.LongTensor, list[torch.LongTensor]]:
    """Generate one image per prompt (per returned sequence) and return its image ids.

    Each prompt is written as ``text <boi>`` (``text <boi> <h_k> <w_k>`` for a variable-size grid, whose
    ``image_size=(h, w)`` is then required; ``text <boi> <n_b>`` for a sequence with token budgets when ``budget=b``
    is given) -- the batch left-padded with the tokenizer's pad token -- and exactly one span is generated. Returns
    image ids ``(B, h, w)`` for the grid layout or ``(B, N)`` for the sequence layout (with a trailing level axis
    ``L`` for residual vocabularies), where ``B`` is ``len(prompts) * num_return_sequences``. For a budgeted sequence
    without ``budget`` the model chooses each span's budget, and the result is a list of ``B`` tensors
    ``(b_i[, L])``. ``generate_kwargs`` go to ``model.generate`` (``do_sample``, ``num_return_sequences``, a
    ``logits_processor`` list, ...); the span length fixes ``max_new_tokens``.
    """
    if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
        raise TypeError("generate_images sets max_new_tokens itself (one image span); do not pass max_new_tokens")
    head = _span_head(vocab, image_size, budget)
    input_ids, attention_mask = _text_to_image_prompts(tokenizer, head, prompts)
    span_processor = ImageSpanLogitsProcessor(
        vocab, _logits_width(model), max_images=0, image_temperature=image_temperature, image_top_k=image_top_k,
        budget=budget,
    )
    user_processors = generate_kwargs.pop("logits_processor", None) or []
    logits_processor = LogitsProcessorList([*user_processors, span_processor])
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if vocab.variable_size:
        span_length = vocab.span_length_of(*image_size)
    else:
        span_length = vocab.span_length_of(1, budget) if budget is not None else vocab.span_length
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        logits_processor=logits_processor,
        max_new_tokens=span_length - len(head),
        **generate_kwargs,
    )
    sequences = output.sequences if hasattr(output, "sequences") else output
    spans = sequences[:, input_ids.shape[1] - len(head) :].cpu()  # (B, span_length): <boi> (+ head) + generated
    if vocab.has_budgets and budget is None:  # spans of the budgets the model chose, each cut at its <eoi>
        return [vocab.parse_span(row[slice(*find_image_spans(row, vocab)[0])]) for row in spans]
    return torch.stack([vocab.parse_span(span) for span in spans])


def _span_head(vocab: ImageVocab, image_size: Optional[Sequence[int]], budget: Optional[int] = None) -> list[int]:
    """The tokens that open a span in a text-to-image prompt: ``<boi>`` (+ ``<h_k> <w_k>`` or ``<n_b>``)."""
    if budget is not None:
        return [vocab.boi_token_id, vocab.budget_token(budget)]  # raises unless budget is one of vocab.budgets
    if not vocab.variable_size:
        if image_size is not None and list(image_size) != vocab.grid_size:
            raise ValueError(f"this vocabulary's images are {vocab.grid_size}; image_size={image_size} needs a "
                             "variable-size grid vocabulary")
        return [vocab.boi_token_id]
    if image_size is None:
        raise ValueError("a variable-size grid vocabulary needs image_size=(h, w) to generate images")
    return [vocab.boi_token_id] + vocab.size_tokens(*image_size)


def _text_to_image_prompts(tokenizer, head: list[int], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``text <boi> ...`` ids and attention mask, each ``(B, P)``."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token) first")
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side
    opening = torch.tensor(head, dtype=torch.long).expand(len(prompts), -1)
    input_ids = torch.cat([encoded["input_ids"], opening], dim=1)
    attention_mask = torch.cat([encoded["attention_mask"], torch.ones_like(opening)], dim=1)
    return input_ids, attention_mask


def _logits_width(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        return head.out_features
    return model.config.get_text_config().vocab_size
