"""Tests for mllm.generation.guidance_batched: batched classifier-free guidance (one 2B-row forward per step) against
the unbatched path (model.generate + ImageCFGLogitsProcessor) and against full forwards without a cache."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from mllm.data.tasks import t2i_prompt
from mllm.generation.guidance import ImageCFGLogitsProcessor, _StepGuidance, guide, guided_generate_image_ids
from mllm.generation.guidance_batched import generate_with_batched_guidance
from mllm.generation.logits import ImageSpanLogitsProcessor

from tests.mllm.generation.test_guidance import CAPTIONS, tiny_bridged

hf_logging.set_verbosity_error()

LAYOUTS = {
    "grid": dict(grid_size=(2, 3)),
    "variable": dict(grid_size=(2, 3), variable_size=True),
    "budgets": dict(layout="sequence", budgets=[2, 5]),
}


def build(layout: str):
    return tiny_bridged(**LAYOUTS[layout])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def bridged(request):
    return build(request.param)


@pytest.fixture(scope="module")
def grid():
    return build("grid")


def encode(processor, texts, boi=True):
    batch = processor(text=texts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if boi:
        ids = torch.cat([ids, torch.full((len(texts), 1), processor.image_vocab.boi_token_id)], dim=1)
        mask = torch.cat([mask, torch.ones(len(texts), 1, dtype=mask.dtype)], dim=1)
    return ids, mask


def same_images(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


class Record(LogitsProcessor):
    """Keeps a copy of the scores it sees."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


SETTINGS = {
    "greedy": dict(),
    "sampling": dict(do_sample=True),
    "sampling_repeats_knobs": dict(do_sample=True, num_return_sequences=2, image_temperature=0.8, image_top_k=8,
                                   image_top_p=0.9),
    "sampling_warpers": dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.95),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_batched_gives_the_ids_of_the_unbatched_path(bridged, setting, batch):
    model, processor = bridged
    kwargs = SETTINGS[setting]
    images = {}
    for batched in (True, False):
        torch.manual_seed(7)
        images[batched] = guided_generate_image_ids(model, processor, CAPTIONS[:batch], 3.0, cfg_batched=batched,
                                                    **kwargs)
    assert same_images(images[True], images[False])
    count = batch * kwargs.get("num_return_sequences", 1)
    vocab = processor.image_vocab
    assert len(images[True]) == count
    for image in images[True]:  # parsed spans (parse_span raised on a malformed one)
        expected = (vocab.grid_size if vocab.layout == "grid" else None)
        assert expected is None or tuple(image.shape) == tuple(expected)
        assert 0 <= int(image.min()) and int(image.max()) < vocab.codebook_size
    if vocab.has_budgets:
        assert all(image.shape[0] in vocab.budgets for image in images[True])


def test_budgets_close_at_different_steps_and_still_match(grid):
    """With sampling, budgeted spans of one batch end at different steps; the batched loop stops once all are closed."""
    model, processor = build("budgets")
    torch.manual_seed(3)
    lengths = set()
    for seed in range(4):
        torch.manual_seed(seed)
        batched = guided_generate_image_ids(model, processor, CAPTIONS, 2.0, do_sample=True)
        torch.manual_seed(seed)
        assert same_images(batched, guided_generate_image_ids(model, processor, CAPTIONS, 2.0, do_sample=True,
                                                              cfg_batched=False))
        lengths |= {image.shape[0] for image in batched}
    assert lengths == {2, 5}  # both budgets were chosen: rows did close at different steps


def plain_generate(model, processor, texts, **kwargs):
    """Image ids of model.generate with the span processor alone (no guidance code involved)."""
    ids, mask = encode(processor, texts)
    vocab = processor.image_vocab
    span = ImageSpanLogitsProcessor(vocab, model.config.vocab_size)
    out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([span]),
                         max_new_tokens=vocab.span_length - 1, pad_token_id=processor.tokenizer.pad_token_id, **kwargs)
    return torch.stack([vocab.parse_span(row) for row in out[:, ids.shape[1] - 1:]])


@pytest.mark.parametrize("do_sample", [False, True])
def test_scale_one_is_the_conditional_and_scale_zero_the_unconditional_generation(grid, do_sample):
    model, processor = grid
    texts = [t2i_prompt(c) for c in CAPTIONS]
    torch.manual_seed(5)
    conditional = plain_generate(model, processor, texts, do_sample=do_sample)
    torch.manual_seed(5)
    assert torch.equal(guided_generate_image_ids(model, processor, CAPTIONS, 1.0, do_sample=do_sample), conditional)
    torch.manual_seed(5)
    unconditional = plain_generate(model, processor, [t2i_prompt(None)] * 3, do_sample=do_sample)
    torch.manual_seed(5)
    assert torch.equal(guided_generate_image_ids(model, processor, CAPTIONS, 0.0, do_sample=do_sample), unconditional)
    if not do_sample:  # the checks above are not vacuous (sampled from these peaked logits, the two may agree)
        assert not torch.equal(conditional, unconditional)
    guided = guided_generate_image_ids(model, processor, CAPTIONS, 4.0)
    assert not torch.equal(guided, plain_generate(model, processor, texts))


def full_forward_logits(model, ids, mask):
    """Last-position logits of a forward over whole sequences, without a cache."""
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


@torch.no_grad()
def test_guided_logits_match_full_forwards_and_text_rows_are_untouched(grid):
    """Rows 0-1 generate an image, row 2 is text (never guided); the unconditional prompt is longer than the
    conditional ones, so the conditional half is the padded one. Every step's guided scores are compared with
    full forwards of the conditional sequences and of unconditional prompt + generated tokens."""
    model, processor = grid
    vocab, scale = processor.image_vocab, 2.5
    cond_ids, cond_mask = encode(processor, [t2i_prompt(CAPTIONS[0]), t2i_prompt(CAPTIONS[1]), "a red"])
    cond_ids[2, -1] = processor.tokenizer.convert_tokens_to_ids("circle")  # row 2: no span open
    uncond_ids, uncond_mask = encode(processor, [t2i_prompt(CAPTIONS[2]) + " at the top"])
    assert uncond_ids.shape[1] > cond_ids.shape[1]
    guidance, record = _StepGuidance(vocab, scale), Record()
    steps = 5
    out = generate_with_batched_guidance(model, cond_ids, cond_mask, uncond_ids, uncond_mask, guidance,
                                         LogitsProcessorList([guidance, record]), steps)
    assert out.shape == (3, cond_ids.shape[1] + steps) and torch.equal(out[:, : cond_ids.shape[1]], cond_ids)
    for step in range(steps):
        generated = out[:, cond_ids.shape[1]: cond_ids.shape[1] + step]
        ids = out[:, : cond_ids.shape[1] + step]
        mask = torch.cat([cond_mask, torch.ones_like(generated)], dim=1)
        cond = full_forward_logits(model, ids, mask)
        uncond = full_forward_logits(model, torch.cat([uncond_ids.expand(3, -1), generated], dim=1),
                                     torch.ones(3, uncond_ids.shape[1] + step, dtype=torch.long))
        expected = torch.lerp(uncond.log_softmax(-1), cond.log_softmax(-1), scale)  # written out, not guide()
        torch.testing.assert_close(record.scores[step][:2], expected[:2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(record.scores[step][2], cond[2], atol=1e-4, rtol=1e-4)
        assert torch.equal(out[:, cond_ids.shape[1] + step], record.scores[step].argmax(-1))  # greedy took them


@torch.no_grad()
def test_guided_scores_equal_the_unbatched_path_step_by_step(grid):
    model, processor = grid
    vocab = processor.image_vocab
    cond_ids, cond_mask = encode(processor, [t2i_prompt(c) for c in CAPTIONS])
    uncond_ids, uncond_mask = encode(processor, [t2i_prompt(None)])
    records = {}
    for batched in (True, False):
        span, record = ImageSpanLogitsProcessor(vocab, model.config.vocab_size), Record()
        guidance = (_StepGuidance(span, 3.0) if batched else
                    ImageCFGLogitsProcessor(model, span, uncond_ids, 3.0, uncond_mask))
        processors = LogitsProcessorList([guidance, span, record])
        torch.manual_seed(11)
        if batched:
            out = generate_with_batched_guidance(model, cond_ids, cond_mask, uncond_ids, uncond_mask, guidance,
                                                 processors, vocab.span_length - 1, do_sample=True,
                                                 num_return_sequences=2)
        else:
            out = model.generate(input_ids=cond_ids, attention_mask=cond_mask, logits_processor=processors,
                                 max_new_tokens=vocab.span_length - 1, do_sample=True, num_return_sequences=2,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        records[batched] = (out, record.scores)
    assert torch.equal(records[True][0], records[False][0])
    assert len(records[True][1]) == len(records[False][1]) == vocab.span_length - 1
    for ours, theirs in zip(records[True][1], records[False][1]):
        assert ours.shape == (6, model.config.vocab_size)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # -inf where the grammar forbids, in both


def test_guide_is_the_formula_and_keeps_forbidden_ids_out():
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    cond[0, 3] = float("-inf")
    out = guide(cond, uncond, 2.0)
    expected = uncond.log_softmax(-1) + 2.0 * (cond.log_softmax(-1) - uncond.log_softmax(-1))
    assert out[0, 3] == float("-inf")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite])


def test_a_static_cache_gives_the_same_ids(grid):
    model, processor = grid
    torch.manual_seed(2)
    dynamic = guided_generate_image_ids(model, processor, CAPTIONS, 3.0, do_sample=True, num_return_sequences=2)
    torch.manual_seed(2)
    static = guided_generate_image_ids(model, processor, CAPTIONS, 3.0, do_sample=True, num_return_sequences=2,
                                       cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(streamer=object()), TypeError, "cfg_batched=True does not take streamer"),
    (dict(logits_processor=LogitsProcessorList()), TypeError, "does not take logits_processor"),
    (dict(output_scores=True), TypeError, "does not take output_scores"),
    (dict(attention_bias=1), TypeError, "does not take attention_bias"),
    (dict(num_beams=2), ValueError, "does not work with beam search"),
    (dict(max_new_tokens=3), TypeError, "do not pass max_new_tokens"),
    (dict(use_cache=False), ValueError, "use_cache=False"),
    (dict(cache_implementation="offloaded"), ValueError, "cache_implementation='offloaded'"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
])
def test_settings_the_batched_loop_cannot_follow_are_refused(grid, kwargs, error, match):
    model, processor = grid
    with pytest.raises(error, match=match):
        guided_generate_image_ids(model, processor, CAPTIONS[:1], 3.0, **kwargs)


def test_a_model_generation_config_it_cannot_follow_is_named(grid):
    model, processor = grid
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ValueError, match="repetition_penalty=1.3.*cfg_batched=False"):
            guided_generate_image_ids(model, processor, CAPTIONS[:1], 3.0)
        assert guided_generate_image_ids(model, processor, CAPTIONS[:1], 3.0, cfg_batched=False).shape == (1, 2, 3)
    finally:
        model.generation_config.repetition_penalty = None


def test_unconditional_prompts_must_divide_the_batch(grid):
    model, processor = grid
    cond_ids, cond_mask = encode(processor, [t2i_prompt(c) for c in CAPTIONS])
    uncond_ids, uncond_mask = encode(processor, [t2i_prompt(None)] * 2)
    guidance = _StepGuidance(processor.image_vocab, 2.0)
    with pytest.raises(ValueError, match="2 unconditional prompts cannot be spread over a batch of 3 rows"):
        generate_with_batched_guidance(model, cond_ids, cond_mask, uncond_ids, uncond_mask, guidance,
                                       LogitsProcessorList([guidance]), 3)
