"""Task builders: each turns a record into an :class:`Example` of ``(prompt, target)`` strings with ``<image>``
placeholders (plus, for multi-image tasks, the image ids that fill them).

The processor expands the placeholders into image spans and puts the loss on the target only, so every task is a
small pure function here, tested on its own. Templates are deliberately plain words so that a tiny word-level
tokenizer covers them.

- captioning (image -> text): ``"<image> caption:"`` -> ``"a red circle at the top left"``
- text-to-image: ``"draw: a red circle ..."`` -> ``"<image>"``; with probability ``prompt_dropout`` the caption is
  dropped (``"draw:"``), which trains the unconditional branch used by classifier-free guidance.
- image decompression (UniCode, Zheng et al., ECCV 2024): ``"<image> decompress:"`` -> ``"<image>"``; the prompt
  image is a *compressed* form of the target image and the model learns to emit the full id map. UniCode compresses
  by stacking residual-quantization levels into one position; our spans all share the vocabulary's single grid, so
  the compressed form here is the id map, on that same grid, of the image after a 2x box-filter downsample and a
  bilinear upsample back (:func:`compress_pixels`): it keeps a quarter of the pixel information (the low
  frequencies), is made by the same visual tokenizer so every id is in-distribution for the codebook, and needs no
  new span grammar. The model learns to restore the detail (edges, texture) that the downsample removed.
- interleaved documents: text, image, text, image ...; loss on everything after an optional prefix of items.
- instruction tuning: a conversation rendered with the LLM's chat template; the loss is on assistant turns only, so
  an example holds one ``(context, assistant turn)`` pair per turn (see :mod:`mllm.data.conversation`).

Every task is reachable from a mixture ``{task: weight}`` through :func:`choose_task` and :func:`make_example`. From
captioned images (:class:`Record`) every task is made, interleaved documents and conversations synthesized from a few
records (:func:`caption_document`, :func:`chat_from_records`); a pre-tokenized :class:`Document` or
:class:`Conversation` (``vtok pretokenize`` of documents or conversations) feeds its own task as it is
(``TASK_OF_KIND``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .conversation import split_conversation

PLACEHOLDER = "<image>"
CAPTION_PROMPT = f"{PLACEHOLDER} caption:"
DRAW_PREFIX = "draw:"
DECOMPRESS_PROMPT = f"{PLACEHOLDER} decompress:"
TASK_WORDS = ("caption", ":", "draw")
# words the newer tasks add to a word-level vocabulary (kept apart so the vocabulary of a captioning + text-to-image
# mixture, and thus its initialisation, is unchanged)
EXTRA_TASK_WORDS = {"decompression": ("decompress",), "instruction": ("user", "assistant", "system")}
# A minimal chat template for tokenizers that have none (the tiny word-level tokenizer of the demo and tests):
# "<s>user : ... </s> assistant : ... </s>". Real LLMs bring their own template.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
TASK_OF_KIND = {"documents": "interleaved", "conversations": "instruction"}  # the task a record kind feeds
INTERLEAVED_RECORDS = 2  # captioned images per synthesized interleaved document
CHAT_RECORDS = 2  # turns per synthesized conversation


@dataclass(frozen=True)
class Example:
    """One training sample: ``(prompt, target)`` pairs in order (prompt: no loss, target: loss) and their images.

    ``prompt``/``target`` are the first pair and ``more`` holds any further ones (multi-turn chat). ``images`` are
    the image ids that fill the placeholders in reading order; empty means the caller supplies the record's own
    image (single-image tasks built from a caption alone). ``chat`` marks text rendered by a chat template, which
    already holds the BOS and end-of-turn tokens, so none are added.
    """

    prompt: str
    target: str
    task: str
    images: tuple = field(default=(), compare=False, repr=False)
    more: tuple = ()
    chat: bool = False

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return ((self.prompt, self.target), *self.more)

    @property
    def num_images(self) -> int:
        return sum(p.count(PLACEHOLDER) + t.count(PLACEHOLDER) for p, t in self.pairs)


@dataclass(frozen=True)
class Record:
    """What the mixture builds examples from: a caption, its image ids ``(h, w)`` and, for decompression, the ids of
    the compressed image (:func:`compress_pixels`)."""

    caption: str
    image_ids: Any = None
    compressed_ids: Any = None


@dataclass(frozen=True)
class Document:
    """An interleaved document as pre-tokenized: text items (``str``) and image ids in reading order; the first
    ``prefix`` items are context (no loss)."""

    items: tuple
    prefix: int = 0


@dataclass(frozen=True)
class Conversation:
    """A conversation as pre-tokenized: ``{"role", "content"}`` messages whose string contents hold a ``<image>`` per
    image, and the image ids that fill them in reading order."""

    messages: tuple
    images: tuple = ()


def captioning(caption: str) -> Example:
    if not caption.strip():
        raise ValueError("captioning needs a non-empty caption")
    return Example(CAPTION_PROMPT, caption.strip(), "captioning")


def text_to_image(caption: str, prompt_dropout: float = 0.0, rng: Optional[random.Random] = None) -> Example:
    dropped = prompt_dropout > 0 and (rng or random).random() < prompt_dropout
    prompt = DRAW_PREFIX if dropped or not caption.strip() else f"{DRAW_PREFIX} {caption.strip()}"
    return Example(prompt, PLACEHOLDER, "text_to_image")


def t2i_prompt(caption: Optional[str]) -> str:
    """The generation prompt matching :func:`text_to_image` (``None`` gives the unconditional prompt)."""
    return f"{DRAW_PREFIX} {caption}" if caption else DRAW_PREFIX


# ---------------------------------------------------------------------------------------------- decompression
def compress_pixels(pixel_values: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The lossy image that decompression starts from: ``(B, 3, H, W)`` -> box-filter downsample by ``factor`` ->
    bilinear upsample back -> ``(B, 3, H, W)`` (same size, so the visual tokenizer gives an id map on the same grid).
    """
    if pixel_values.dim() != 4 or pixel_values.shape[-1] % factor or pixel_values.shape[-2] % factor:
        raise ValueError(f"pixel_values must be (B, 3, H, W) with H, W multiples of {factor}, "
                         f"got {tuple(pixel_values.shape)}")
    small = F.avg_pool2d(pixel_values, factor)  # (B, 3, H/f, W/f)
    return F.interpolate(small, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


def decompression(image_ids, compressed_ids) -> Example:
    """Compressed image (prompt) -> full image (target); both id maps share the vocabulary's grid."""
    full, compressed = torch.as_tensor(image_ids), torch.as_tensor(compressed_ids)
    if full.shape != compressed.shape:
        raise ValueError(f"compressed ids {tuple(compressed.shape)} and full ids {tuple(full.shape)} must have one "
                         "shape")
    return Example(DECOMPRESS_PROMPT, PLACEHOLDER, "decompression", images=(compressed, full))


# ---------------------------------------------------------------------------------------------- interleaved
def interleaved(items: Sequence[Any], prefix: int = 0) -> Example:
    """A document of text items (``str``) and images (image ids) in order; the first ``prefix`` items are context
    (no loss), everything after them is the target."""
    if not 0 <= prefix < len(items):
        raise ValueError(f"prefix must leave at least one of the {len(items)} items as target, got prefix={prefix}")
    words, images = [], []
    for item in items:
        if isinstance(item, str):
            if PLACEHOLDER in item:
                raise ValueError(f"text items must not contain {PLACEHOLDER}: pass images as image-id items")
            words.append(item.strip())
        else:
            words.append(PLACEHOLDER)
            images.append(torch.as_tensor(item))
    prompt, target = " ".join(w for w in words[:prefix] if w), " ".join(w for w in words[prefix:] if w)
    return Example(prompt, target, "interleaved", images=tuple(images))


def caption_document(records: Sequence[Record], rng: random.Random, prefix: int = 0) -> Example:
    """An interleaved document from captioned images: each record gives its caption and image, in a random order."""
    items = []
    for record in records:
        pair = [record.caption, _image_of(record)]
        items += pair if rng.random() < 0.5 else pair[::-1]
    return interleaved(items, prefix)


# ---------------------------------------------------------------------------------------------- instruction
def instruction(messages: Sequence[dict], tokenizer, images: Sequence[Any] = ()) -> Example:
    """A conversation (``[{"role", "content"}]``, images as ``<image>`` in the content) rendered with
    ``tokenizer``'s chat template: one ``(context, assistant turn)`` pair per assistant turn, loss on the turns."""
    pairs = split_conversation(tokenizer, messages)
    (prompt, target), *more = pairs
    example = Example(prompt, target, "instruction", images=tuple(torch.as_tensor(i) for i in images),
                      more=tuple(more), chat=True)
    if example.num_images != len(example.images):
        raise ValueError(f"the conversation has {example.num_images} {PLACEHOLDER} placeholders but "
                         f"{len(example.images)} images were given")
    return example


def chat_from_records(records: Sequence[Record], rng: random.Random, tokenizer) -> Example:
    """A conversation from captioned images: each record becomes a 'describe this' or a 'draw this' turn."""
    messages, images = [], []
    for record in records:
        if rng.random() < 0.5:
            messages += [{"role": "user", "content": CAPTION_PROMPT}, {"role": "assistant", "content": record.caption}]
        else:
            messages += [{"role": "user", "content": t2i_prompt(record.caption)},
                         {"role": "assistant", "content": PLACEHOLDER}]
        images.append(_image_of(record))
    return instruction(messages, tokenizer, images)


# ---------------------------------------------------------------------------------------------- mixture
TASKS = {
    "captioning": captioning,
    "text_to_image": text_to_image,
    "decompression": decompression,
    "interleaved": caption_document,
    "instruction": chat_from_records,
}
RECORDS_PER_EXAMPLE = {"interleaved": INTERLEAVED_RECORDS, "instruction": CHAT_RECORDS}


def choose_task(weights: dict, rng: random.Random) -> str:
    """Draw a task name from a mixture ``{name: weight}``; unknown names are an error."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in the mixture; known tasks: {sorted(TASKS)}")
    names = [n for n, w in weights.items() if w > 0]
    if not names:
        raise ValueError(f"the task mixture {weights} has no positive weight")
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def records_needed(task: str, kind: str = "captions") -> int:
    """How many records :func:`make_example` uses for ``task`` (the sample's own record first); a document or a
    conversation (``kind``) is a whole example by itself."""
    return RECORDS_PER_EXAMPLE.get(task, 1) if kind == "captions" else 1


def make_example(task: str, records: Union[str, Sequence[Record]], prompt_dropout: float, rng: random.Random,
                 tokenizer=None) -> Example:
    """The example of ``task`` for ``records`` (a caption alone, or records whose first one is the sample's own).

    With a caption alone, single-image tasks leave ``images`` empty for the caller to fill; with records, every
    example carries its images. ``tokenizer`` (with a chat template) is needed by ``instruction``. A
    :class:`Document` or :class:`Conversation` first record is the example of its own task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    if isinstance(records, str):
        records = [Record(records)]
    first = records[0]
    if isinstance(first, (Document, Conversation)):
        return _own_example(task, first, tokenizer)
    if task in ("captioning", "text_to_image"):
        if task == "captioning":
            example = captioning(first.caption)
        else:
            example = text_to_image(first.caption, prompt_dropout, rng)
        return replace(example, images=(torch.as_tensor(first.image_ids),)) if first.image_ids is not None else example
    if task == "decompression":
        if first.compressed_ids is None:
            raise ValueError("the decompression task needs the compressed image ids of each record (compressed_ids)")
        return decompression(_image_of(first), first.compressed_ids)
    if task == "interleaved":
        return caption_document(records, rng)
    return chat_from_records(records, rng, _chat_tokenizer(tokenizer))


def _own_example(task: str, record: Union[Document, Conversation], tokenizer) -> Example:
    """The example of a pre-tokenized document (``interleaved``) or conversation (``instruction``)."""
    own = "interleaved" if isinstance(record, Document) else "instruction"
    if task != own:
        raise ValueError(f"a pre-tokenized {type(record).__name__.lower()} feeds the {own} task, not {task!r}")
    if own == "interleaved":
        return interleaved(record.items, record.prefix)
    return instruction(record.messages, _chat_tokenizer(tokenizer), record.images)


def _chat_tokenizer(tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the instruction task needs a text tokenizer with a chat template (tokenizer.chat_template)")
    return tokenizer


def extra_words(tasks: dict) -> list[str]:
    """Words the templates of the mixture's newer tasks add to a word-level vocabulary (beyond ``TASK_WORDS``)."""
    used = [name for name, weight in tasks.items() if weight > 0]
    return list(dict.fromkeys(w for name in used for w in EXTRA_TASK_WORDS.get(name, ())))


def _image_of(record: Record) -> torch.Tensor:
    if record.image_ids is None:
        raise ValueError("this task needs the record's image ids (Record.image_ids)")
    return torch.as_tensor(record.image_ids)
