"""mllm.generation.inference: clear errors for odd inputs, and generation sizes that decoding can handle."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mllm.generation.inference import default_image_size, generate_image_ids, image_sizes
from mllm.generation.logits import generate_images
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

hf_logging.set_verbosity_error()

CAPTIONS = ["a red circle", "a blue square"]


def bridged(**layout):
    tokenizer = build_word_tokenizer(CAPTIONS + ["draw :"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id)).eval()
    vocab = bridge_llm(model, tokenizer, 16, **layout)
    return model, UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab)


@pytest.fixture(scope="module")
def grid():
    return bridged(grid_size=(2, 3))


@pytest.fixture(scope="module")
def variable():
    return bridged(grid_size=(3, 3), variable_size=True)


def test_an_empty_caption_list_and_max_new_tokens_give_clear_errors(grid):
    model, processor = grid
    with pytest.raises(ValueError, match="captions is empty"):
        generate_image_ids(model, processor, [])
    with pytest.raises(TypeError, match="generate_image_ids sets max_new_tokens itself"):
        generate_image_ids(model, processor, CAPTIONS, max_new_tokens=5)
    with pytest.raises(TypeError, match="sets max_new_tokens itself"):
        generate_image_ids(model, processor, CAPTIONS, max_length=50)
    with pytest.raises(ValueError, match="single string"):
        generate_image_ids(model, processor, "a red circle")
    assert generate_image_ids(model, processor, CAPTIONS).shape == (2, 2, 3)


def test_a_one_position_image_is_refused_at_generation(variable):
    model, processor = variable
    vocab = processor.image_vocab
    for size in ((1, 1), [(2, 2), (1, 1)]):
        with pytest.raises(ValueError, match="image size 1x1 is too small to decode"):
            generate_image_ids(model, processor, CAPTIONS, image_size=size)
    with pytest.raises(ValueError, match="too small to decode"):
        generate_images(model, processor.tokenizer, vocab, CAPTIONS, image_size=(1, 1))
    assert image_sizes(vocab, (1, 2), 2) == [(1, 2), (1, 2)]  # two positions decode
    vocab.extra["default_image_size"] = [1, 1]
    try:
        with pytest.raises(ValueError, match="too small to decode"):
            default_image_size(vocab)
    finally:
        del vocab.extra["default_image_size"]
    ids = generate_image_ids(model, processor, CAPTIONS, image_size=(1, 2))
    assert ids.shape == (2, 1, 2)


def test_decoding_a_size_the_decoder_cannot_handle_says_so():
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=16, downsample=8, image_size=32)
    visual_tokenizer = VisualTokenizer(config).eval()
    model, processor = bridged(grid_size=(4, 4), variable_size=True)
    processor = UnifiedProcessor(processor.image_processor, processor.tokenizer, processor.image_vocab,
                                 visual_tokenizer=visual_tokenizer, allow_missing_fingerprint=True)
    with pytest.raises(ValueError, match="cannot decode image ids of shape \\(1, 1\\)"):
        processor.image_ids_to_images([torch.zeros(1, 1, dtype=torch.long)])
    assert processor.image_ids_to_images([torch.zeros(1, 2, dtype=torch.long)])[0].size == (16, 8)
