"""Where image ids live in an LLM vocabulary: how an image is spelled (:mod:`.layout`), the id mapping and persistence
(:mod:`.image_vocab`), span building and strict parsing (:mod:`.spans`), repairing (:mod:`.repair`), a sequence cut
into text and images (:mod:`.pieces`), and the bridge that adds the tokens to a tokenizer and resizes an LLM
(:mod:`.bridge`)."""

from .bridge import add_image_tokens, bridge_llm, resize_llm
from .image_vocab import IMAGE_VOCAB_NAME, ImageVocab
from .layout import LAYOUTS, LEVEL_ORDERS, ImageLayout
from .repair import ParsedSpan
from .spans import CLASS_EOI, CLASS_EOL, CLASS_HEIGHT, CLASS_IMAGE, CLASS_WIDTH, MalformedImageSpanError

__all__ = [
    "CLASS_EOI",
    "CLASS_EOL",
    "CLASS_HEIGHT",
    "CLASS_IMAGE",
    "CLASS_WIDTH",
    "IMAGE_VOCAB_NAME",
    "LAYOUTS",
    "LEVEL_ORDERS",
    "ImageLayout",
    "ImageVocab",
    "MalformedImageSpanError",
    "ParsedSpan",
    "add_image_tokens",
    "bridge_llm",
    "resize_llm",
]
