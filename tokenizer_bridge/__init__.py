"""tokenizer-bridge: visual tokenizers and a bridge that gives any Hugging Face causal LM a unified text+image
token space."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_published_vq import PublishedVQConfig
from .configuration_slot_tokenizer import SlotTokenizerConfig
from .configuration_visual_tokenizer import VisualTokenizerConfig
from .image_processing_visual_tokenizer import (
    ImageLoadError,
    VisualTokenizerImageProcessor,
    load_image,
)
from .modeling_published_vq import PublishedVQTokenizer
from .modeling_slot_tokenizer import SlotTokenizer, SlotTokenizerOutput
from .modeling_visual_tokenizer import VisualTokenizer, VisualTokenizerOutput
from .processing_unified import UnifiedProcessor
from .quantizers import QUANTIZERS, QuantizerOutput, VectorQuantizer
from .vocab import ImageLayout, ImageVocab, MalformedImageSpanError, add_image_tokens, bridge_llm, resize_llm

AutoConfig.register(VisualTokenizerConfig.model_type, VisualTokenizerConfig, exist_ok=True)
AutoModel.register(VisualTokenizerConfig, VisualTokenizer, exist_ok=True)
AutoImageProcessor.register(
    VisualTokenizerConfig, image_processor_classes={"pil": VisualTokenizerImageProcessor}, exist_ok=True
)
AutoProcessor.register(VisualTokenizerConfig, UnifiedProcessor, exist_ok=True)
AutoConfig.register(SlotTokenizerConfig.model_type, SlotTokenizerConfig, exist_ok=True)
AutoModel.register(SlotTokenizerConfig, SlotTokenizer, exist_ok=True)
AutoConfig.register(PublishedVQConfig.model_type, PublishedVQConfig, exist_ok=True)
AutoModel.register(PublishedVQConfig, PublishedVQTokenizer, exist_ok=True)

__all__ = [
    "ImageLayout",
    "ImageLoadError",
    "ImageVocab",
    "MalformedImageSpanError",
    "PublishedVQConfig",
    "PublishedVQTokenizer",
    "QUANTIZERS",
    "QuantizerOutput",
    "SlotTokenizer",
    "SlotTokenizerConfig",
    "SlotTokenizerOutput",
    "UnifiedProcessor",
    "VectorQuantizer",
    "VisualTokenizer",
    "VisualTokenizerConfig",
    "VisualTokenizerImageProcessor",
    "VisualTokenizerOutput",
    "add_image_tokens",
    "bridge_llm",
    "load_image",
    "resize_llm",
]
