"""mllm: what is built on tokenizer-bridge: an LLM bridged from a recipe, data, the one training loop and its stages,
generation helpers, bundles, LLM-level evaluation, the demo and the ``vtok`` command line.

The names below are the public API; the rest is reached through its module (see docs/ARCHITECTURE.md).
"""

from .bundle import load_bundle, save_bundle
from .generation.inference import (
           caption_image_ids,
           caption_images,
           generate_image_ids,
           text_to_image,
)
from .text_tokenizers import build_word_tokenizer

__all__ = ["build_word_tokenizer", "caption_image_ids", "caption_images", "generate_image_ids", "load_bundle",
           "save_bundle", "text_to_image"]
