"""What :class:`~tokenizer_bridge.UnifiedProcessor` takes beyond transformers' processor keywords, as its typed
dicts, and the chat-template prologue that writes image content parts as placeholders.

transformers merges a processor's keyword arguments by modality (``text_kwargs``, ``images_kwargs``, flat keywords
and ``common_kwargs``; defaults from the processor class, the tokenizer's init kwargs, then the call), and routes each
key by these typed dicts. Ours add:

- text: ``add_eos`` (EOS after the target; default: when ``target`` is given) and ``return_loss_masks``;
- images: the image processor's own settings (``resize_mode``, ``size_divisor``, ``background``, ``max_pixels``),
  ``budget`` (slot tokenizers: the token budget raw images are encoded with) and ``return_pixel_values`` (also return
  the preprocessed pixels, as other image-text processors do; off by default because the bridged LLM reads ids only);
- flat: ``target`` (the training target: gets the loss) and ``image_ids`` (precomputed ids instead of images).
"""



import json
from typing import Any, Optional

from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs


class UnifiedTextKwargs(TextKwargs, total=False):
    add_eos: Optional[bool]
    return_loss_masks: Optional[bool]


class UnifiedImagesKwargs(ImagesKwargs, total=False):
    resize_mode: Optional[str]
    size_divisor: Optional[int]
    background: Any
    max_pixels: Optional[int]
    budget: Optional[int]
    return_pixel_values: Optional[bool]


class UnifiedProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: UnifiedTextKwargs
    images_kwargs: UnifiedImagesKwargs
    target: Any
    image_ids: Any


# text keywords the processor honours; any other TextKwargs key given a value is refused (it would be ignored)
SUPPORTED_TEXT_KWARGS = {"add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of",
                         "return_attention_mask", "padding_side", "return_tensors", "add_eos", "return_loss_masks",
                         "return_mm_token_type_ids", "verbose"}
# images keywords that are the processor's, not the image processor's
PROCESSOR_IMAGE_KWARGS = ("budget", "return_pixel_values", "return_tensors")

PROMPT_RENAMED = (
    "prompt= is gone: UnifiedProcessor follows transformers' meaning of text= (the text to tokenize, no labels, as "
    "tokenizer(text) does). Pass the conditioning part as text= and the training target (which gets the labels and "
    "the EOS) as target=, e.g. processor(text='<image> caption:', target='a red circle', images=[img])"
)


def check_text_kwargs(text_kwargs: dict) -> None:
    """Refuse text keywords the processor would otherwise silently ignore (``text_pair``, ``stride``, offsets...)."""
    unsupported = sorted(k for k, v in text_kwargs.items() if k not in SUPPORTED_TEXT_KWARGS and v not in (None, False))
    if unsupported:
        raise ValueError(f"UnifiedProcessor does not support the text keyword(s) {unsupported}: it tokenizes the text "
                         "between image placeholders itself and never truncates")


def content_parts_template(template: str, placeholder: str) -> str:
    """``template`` (a chat template written for string message contents, e.g. the LLM tokenizer's) preceded by a
    Jinja prologue that turns list contents (``[{"type": "text", "text": ...}, {"type": "image"}, ...]``, the
    transformers chat format) into strings with ``placeholder`` where each image part stands. String contents pass
    through unchanged, so text-only conversations render exactly as the tokenizer renders them."""
    literal = json.dumps(placeholder)
    prologue = (
        "{%- set _parts = namespace(messages=[]) -%}"
        "{%- for _message in messages -%}"
        "{%- if _message['content'] is string or _message['content'] is none -%}"
        "{%- set _parts.messages = _parts.messages + [_message] -%}"
        "{%- else -%}"
        "{%- set _text = namespace(value='') -%}"
        "{%- for _part in _message['content'] -%}"
        "{%- if _part['type'] == 'text' -%}{%- set _text.value = _text.value + _part['text'] -%}"
        "{%- elif _part['type'] == 'image' -%}{%- set _text.value = _text.value + " + literal + " -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _parts.messages = _parts.messages + [dict(_message, content=_text.value)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _parts.messages -%}"
    )
    return prologue + template
