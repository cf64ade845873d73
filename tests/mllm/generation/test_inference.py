"""mllm.generation.inference: clear errors for odd inputs, and generation sizes that decoding can handle."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mllm.generation.inference import generate_image_ids
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


def test_every_size_generation_allows_decodes_a_1x1_grid_included():
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=16, downsample=8, image_size=32)
    visual_tokenizer = VisualTokenizer(config).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        visual_tokenizer.decode(torch.zeros(1, 1, 1, dtype=torch.long))  # the decoder alone cannot
    model, processor = bridged(grid_size=(4, 4), variable_size=True)
    processor = UnifiedProcessor(processor.image_processor, processor.tokenizer, processor.image_vocab,
                                 visual_tokenizer=visual_tokenizer, allow_missing_fingerprint=True)
    ids = generate_image_ids(model, processor, CAPTIONS, image_size=[(1, 1), (1, 2)])
    assert [tuple(i.shape) for i in ids] == [(1, 1), (1, 2)]
    one, two = processor.image_ids_to_images(ids)
    assert one.size == (8, 8) and two.size == (16, 8)
    blocks = visual_tokenizer.decode(ids[0].repeat(2, 2)[None])  # the same id as a 2x2 block, pooled back
    expected = processor.image_processor.postprocess(torch.nn.functional.avg_pool2d(blocks, 2))[0]
    assert one.tobytes() == expected.tobytes()
    pieces = processor.decode(processor(target=["a red <image>"], image_ids=[ids[0]], padding=True, return_tensors="pt")["input_ids"][0])
    assert pieces[0] == "a red" and pieces[1].size == (8, 8)
