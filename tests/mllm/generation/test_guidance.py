"""Tests for mllm.generation.guidance: classifier-free guidance and top-p restricted to image spans, on tiny random models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.utils import logging as hf_logging

from mllm.data.tasks import t2i_prompt
from mllm.generation.guidance import (
    ImageCFGLogitsProcessor,
    ImageTopPLogitsWarper,
    guided_generate_image_ids,
)
from mllm.generation.inference import _prompt_batch, generate_image_ids
from mllm.generation.logits import ImageSpanLogitsProcessor
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import ImageVocab
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

hf_logging.set_verbosity_error()

CAPTIONS = ["a red circle at the top left", "a blue square", "a green triangle at the bottom right"]
GRID = (2, 3)


def tiny_bridged(**layout):
    """A tiny random Llama bridged to a 16-id image vocabulary of ``layout``, and its processor (no visual
    tokenizer needed)."""
    tokenizer = build_word_tokenizer(CAPTIONS + ["draw :"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    vocab = bridge_llm(model, tokenizer, 16, init="normal", **layout)
    with torch.no_grad():  # sharper, prompt-dependent logits so that guidance visibly changes the images
        model.lm_head.weight.mul_(20)
    processor = UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab)
    return model.eval(), processor


@pytest.fixture(scope="module")
def bridged():
    return tiny_bridged(grid_size=GRID)


def prompts(processor, captions):
    return _prompt_batch(processor, [t2i_prompt(c) for c in captions], append_boi=True)


def generate(model, processor, processors, captions, **kwargs):
    input_ids, mask = prompts(processor, captions)
    vocab = processor.image_vocab
    out = model.generate(input_ids=input_ids, attention_mask=mask, logits_processor=LogitsProcessorList(processors),
                         max_new_tokens=vocab.span_length - 1, pad_token_id=processor.tokenizer.pad_token_id, **kwargs)
    return out[:, input_ids.shape[1] :]


def cfg(model, processor, span, scale):
    uncond_ids, uncond_mask = prompts(processor, [None])
    return ImageCFGLogitsProcessor(model, span, uncond_ids, scale, uncond_mask)


@pytest.mark.parametrize("do_sample", [False, True])
def test_scale_one_is_unguided_generation(bridged, do_sample):
    model, processor = bridged
    span = ImageSpanLogitsProcessor(processor.image_vocab, model.config.vocab_size)
    torch.manual_seed(1)
    plain = generate(model, processor, [span], CAPTIONS, do_sample=do_sample)
    torch.manual_seed(1)
    guided = generate(model, processor, [cfg(model, processor, span, 1.0), span], CAPTIONS, do_sample=do_sample)
    assert torch.equal(plain, guided)


def test_scale_zero_is_the_unconditional_generation(bridged):
    model, processor = bridged
    unconditional = generate_image_ids(model, processor, [None] * len(CAPTIONS))
    assert torch.equal(guided_generate_image_ids(model, processor, CAPTIONS, 0.0), unconditional)
    conditional = generate_image_ids(model, processor, CAPTIONS)
    assert not torch.equal(conditional, unconditional)  # the check above is not vacuous


def test_guided_spans_are_well_formed_with_sampling_and_repeats(bridged):
    model, processor = bridged
    torch.manual_seed(2)
    ids = guided_generate_image_ids(model, processor, CAPTIONS[:2], 3.0, do_sample=True, num_return_sequences=2,
                                    image_temperature=0.8, image_top_k=8, image_top_p=0.9)
    assert ids.shape == (4, *GRID)  # parse_span raised on any malformed span
    assert 0 <= int(ids.min()) and int(ids.max()) < processor.image_vocab.codebook_size
    plain = guided_generate_image_ids(model, processor, CAPTIONS, 1.0)
    assert not torch.equal(guided_generate_image_ids(model, processor, CAPTIONS, 4.0), plain)


def test_guided_logits_follow_the_formula_and_text_rows_are_untouched(bridged):
    """Drive the processor by hand: rows 0-1 generate an image, row 2 writes text; compare with full forwards."""
    model, processor = bridged
    vocab, scale = processor.image_vocab, 3.0
    tokenizer = processor.tokenizer
    cond_ids, cond_mask = _prompt_batch(processor, [t2i_prompt(CAPTIONS[0]), t2i_prompt(CAPTIONS[1]), "a red"],
                                        append_boi=True)
    cond_ids[2, -1] = tokenizer.convert_tokens_to_ids("circle")  # row 2: text, no span open
    uncond_ids, _ = prompts(processor, [None])
    guidance = ImageCFGLogitsProcessor(model, vocab, uncond_ids, scale)
    image_token = vocab.offset + 5
    new_tokens = torch.tensor([[image_token, image_token, tokenizer.convert_tokens_to_ids("blue")]] * 3)
    ids, mask = cond_ids, cond_mask
    for step in range(3):
        with torch.no_grad():
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            cond = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            generated = ids[:, cond_ids.shape[1] :]
            uncond = model(torch.cat([uncond_ids.expand(3, -1), generated], dim=1)).logits[:, -1]
        out = guidance(ids, cond.clone())
        expected = uncond.log_softmax(-1) + scale * (cond.log_softmax(-1) - uncond.log_softmax(-1))
        torch.testing.assert_close(out[:2], expected[:2], atol=1e-4, rtol=1e-4)
        assert torch.equal(out[2], cond[2])
        ids = torch.cat([ids, new_tokens[:, step : step + 1]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def test_guidance_rejects_a_batch_its_prompts_do_not_divide(bridged):
    model, processor = bridged
    uncond_ids = torch.cat([prompts(processor, [None])[0]] * 2)  # two unconditional prompts
    guidance = ImageCFGLogitsProcessor(model, processor.image_vocab, uncond_ids, 2.0)
    with pytest.raises(ValueError, match="cannot be spread"):
        guidance(prompts(processor, CAPTIONS)[0], torch.zeros(3, model.config.vocab_size))


@pytest.mark.parametrize("layout", ["grid", "sequence"])
def test_top_p_filters_image_rows_only(layout):
    extra = dict(grid_size=(2, 2), eol_token_id=12) if layout == "grid" else dict(layout="sequence", num_tokens=4)
    vocab = ImageVocab(offset=13, codebook_size=8, boi_token_id=10, eoi_token_id=11, **extra)
    text_row = [3, 4, 5, 6]
    image_row = [3, 4, 5, vocab.boi_token_id]
    input_ids = torch.tensor([text_row, image_row, image_row])
    torch.manual_seed(0)
    scores = torch.randn(3, 21) * 3
    span = ImageSpanLogitsProcessor(vocab, 21)
    masked = span(input_ids, scores)
    for source in (vocab, span):
        out = ImageTopPLogitsWarper(source, 0.5)(input_ids, masked)
        assert torch.equal(out[0], masked[0])  # text row untouched
        for row in (1, 2):
            kept = out[row].isfinite()
            probs = masked[row].softmax(-1)
            # the kept ids are the most likely ones, and the smallest such set holding at least half the mass
            assert probs[kept].min() >= torch.cat([probs[~kept & masked[row].isfinite()], torch.zeros(1)]).max()
            assert probs[kept].sum() >= 0.5 and probs[kept].sum() - probs[kept].min() < 0.5
            assert vocab.is_image_token(kept.nonzero().flatten()).all()
    assert torch.equal(ImageTopPLogitsWarper(vocab, 1.0)(input_ids, masked), masked)
    with pytest.raises(ValueError):
        ImageTopPLogitsWarper(vocab, 0.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), "strong", None])
def test_guidance_refuses_a_scale_that_is_not_a_finite_number(bridged, scale):
    model, processor = bridged
    span = ImageSpanLogitsProcessor(processor.image_vocab, model.config.vocab_size)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        cfg(model, processor, span, scale)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        guided_generate_image_ids(model, processor, CAPTIONS[:1], guidance_scale=scale)


def test_guided_generation_refuses_beam_search_and_max_new_tokens(bridged):
    model, processor = bridged
    with pytest.raises(ValueError, match="does not work with beam search \\(num_beams=2\\)"):
        guided_generate_image_ids(model, processor, CAPTIONS[:1], guidance_scale=3.0, num_beams=2)
    with pytest.raises(TypeError, match="do not pass max_new_tokens"):
        guided_generate_image_ids(model, processor, CAPTIONS[:1], guidance_scale=3.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="captions is empty"):
        guided_generate_image_ids(model, processor, [], guidance_scale=3.0)
    assert guided_generate_image_ids(model, processor, CAPTIONS[:1], guidance_scale=3.0, num_beams=1).shape == \
        (1, *GRID)
