"""tokenizer-bridge: visual tokenizers and a bridge that gives any Hugging Face causal LM a unified text+image
token space."""

from transformers import AutoConfig, AutoModel

from .configuration_visual_tokenizer import VisualTokenizerConfig
from .image_vocab import ImageVocab, MalformedImageSpanError
from .modeling_visual_tokenizer import VisualTokenizer, VisualTokenizerOutput
from .quantizers import QUANTIZERS, QuantizerOutput, VectorQuantizer

AutoConfig.register(VisualTokenizerConfig.model_type, VisualTokenizerConfig, exist_ok=True)
AutoModel.register(VisualTokenizerConfig, VisualTokenizer, exist_ok=True)

__all__ = [
    "ImageVocab",
    "MalformedImageSpanError",
    "QUANTIZERS",
    "QuantizerOutput",
    "VectorQuantizer",
    "VisualTokenizer",
    "VisualTokenizerConfig",
    "VisualTokenizerOutput",
]
