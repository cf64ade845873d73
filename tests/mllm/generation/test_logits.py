"""Tests for mllm.generation.logits: constrained image-span generation with tiny random models built in code."""

import doctest
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

import mllm.generation.logits as generation
from mllm.generation.logits import (
    ImageSpanLogitsProcessor,
    find_image_spans,
    generate_images,
)
from tokenizer_bridge import ImageVocab, MalformedImageSpanError

hf_logging.set_verbosity_error()

PAD, BOS, EOS = 0, 1, 2
TEXT_IDS = range(3, 50)
VOCAB_SIZE = 72  # logits width: wider than the 69 ids the vocabularies use
GRID = ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, eol_token_id=52, grid_size=(3, 4))
SEQ = ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, layout="sequence", num_tokens=6)
PROMPT_KINDS = ("text", "boi", "image_then_text", "image_then_boi", "mid_span")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode several times faster on one thread (and do not fight parallel test workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- tiny misbehaving models
def tiny_model(arch: str, seed: int):
    """A random tiny LM whose lm_head is biased toward <eoi>/<eol>/image ids/<boi>, so constraints do real work."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=512, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS,
        )
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # context-dependent logits of a few units
    bias = torch.randn(VOCAB_SIZE) * 3
    bias[GRID.offset : GRID.offset + GRID.codebook_size] += 3
    bias[[GRID.eoi_token_id, GRID.eol_token_id]] += 8
    bias[GRID.boi_token_id] += 4
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    return model.eval()


def make_prompt(kind: str, vocab: ImageVocab, rng: random.Random) -> list[int]:
    def text():
        return [rng.choice(TEXT_IDS) for _ in range(rng.randint(1, 5))]

    def span():
        return vocab.build_span(torch.randint(0, vocab.codebook_size, (vocab.num_image_ids,))).tolist()

    if kind == "text":
        return [BOS] + text()
    if kind == "boi":
        return [BOS] + text() + [vocab.boi_token_id]
    if kind == "image_then_text":
        return [BOS] + text() + span() + text()
    if kind == "image_then_boi":
        return [BOS] + text() + span() + text() + [vocab.boi_token_id]
    return [BOS] + text() + span()[: 1 + rng.randint(1, vocab.span_length - 2)]  # mid_span: <boi> + some body


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def mixed_batch(vocab: ImageVocab, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    kinds = list(PROMPT_KINDS) + [rng.choice(PROMPT_KINDS)]
    rng.shuffle(kinds)
    return left_pad([make_prompt(kind, vocab, rng) for kind in kinds])


# ---------------------------------------------------------------------- reference grammar (independent of the module)
def expected_kind(vocab: ImageVocab, k: int) -> str:
    """What the k-th token after <boi> must be."""
    if k == vocab.span_length - 2:
        return "eoi"
    if vocab.layout == "grid" and k % (vocab.grid_size[1] + 1) == vocab.grid_size[1]:
        return "eol"
    return "image"


def token_kind(vocab: ImageVocab, token: int) -> str:
    if vocab.offset <= token < vocab.offset + vocab.codebook_size:
        return "image"
    return {vocab.boi_token_id: "boi", vocab.eoi_token_id: "eoi", vocab.eol_token_id: "eol"}.get(token, "text")


def walk(tokens: list[int], vocab: ImageVocab):
    """Walk the span grammar; return None if the row ends in text, else the offset of the open span's next token."""
    k = None
    for i, token in enumerate(tokens):
        kind = token_kind(vocab, token)
        if k is None:
            assert kind in ("text", "boi"), f"{kind} token {token} outside an image span at {i}: {tokens}"
            k = 0 if kind == "boi" else None
        else:
            want = expected_kind(vocab, k)
            assert kind == want, f"span position {k} holds {kind} token {token}, expected {want}: {tokens}"
            k = None if want == "eoi" else k + 1
    return k


def check_generation(sequences: torch.Tensor, prompts: torch.Tensor, vocab: ImageVocab, copies: int = 1) -> int:
    """Assert every row is well formed and every span the prompt opened is complete; return the spans seen."""
    seen = 0
    for row, sequence in enumerate(sequences.tolist()):
        walk(sequence, vocab)
        spans = find_image_spans(torch.tensor(sequence), vocab)
        for start, end in spans:
            if end < len(sequence) or sequence[-1] == vocab.eoi_token_id:
                image_ids = vocab.parse_span(torch.tensor(sequence[start:end]))
                assert image_ids.numel() == vocab.num_image_ids
                seen += 1
        prompt = prompts[row // copies].tolist()
        if walk(prompt, vocab) is not None:  # the prompt opened a span: it must be completed in time
            start = max(i for i, t in enumerate(prompt) if t == vocab.boi_token_id)
            vocab.parse_span(torch.tensor(sequence[start : start + vocab.span_length]))
    return seen


def constrained_generate(model, vocab, input_ids, attention_mask, max_new_tokens=40, **kwargs):
    processor = ImageSpanLogitsProcessor(vocab, VOCAB_SIZE)
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=max_new_tokens, pad_token_id=PAD, **kwargs,
    )


SAMPLING = dict(do_sample=True, top_k=0, temperature=1.5)


# ---------------------------------------------------------------------- generation is always well formed
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_llama_grid_spans_well_formed_over_seeds(mode):
    spans = 0
    for seed in range(30):
        model = tiny_model("llama", seed)
        input_ids, attention_mask = mixed_batch(GRID, seed)
        kwargs = dict(SAMPLING, num_return_sequences=2) if mode == "sample" else dict(do_sample=False)
        torch.manual_seed(seed)
        out = constrained_generate(model, GRID, input_ids, attention_mask, **kwargs)
        spans += check_generation(out, input_ids, GRID, copies=kwargs.get("num_return_sequences", 1))
    assert spans > 100  # plenty of spans were really generated and checked


@pytest.mark.parametrize("vocab", [GRID, SEQ], ids=["grid", "sequence"])
def test_gpt2_spans_well_formed(vocab):
    for seed in range(8):
        model = tiny_model("gpt2", seed)
        input_ids, attention_mask = mixed_batch(vocab, seed)
        torch.manual_seed(seed)
        check_generation(constrained_generate(model, vocab, input_ids, attention_mask), input_ids, vocab)
        out = constrained_generate(model, vocab, input_ids, attention_mask, **SAMPLING, num_return_sequences=2)
        check_generation(out, input_ids, vocab, copies=2)


def test_beam_search_reordering_rows_stays_well_formed():
    for seed in range(4):
        model = tiny_model("llama", seed)
        input_ids, attention_mask = mixed_batch(GRID, seed)
        out = constrained_generate(model, GRID, input_ids, attention_mask, max_new_tokens=30, num_beams=3,
                                   num_return_sequences=2, do_sample=False)
        check_generation(out, input_ids, GRID, copies=2)


def test_unconstrained_models_do_misbehave():
    """Guard for the tests above: without the processor the biased models break the grammar."""
    broken = 0
    for seed in range(6):
        model = tiny_model("llama", seed)
        input_ids, attention_mask = mixed_batch(GRID, seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20,
                             pad_token_id=PAD, do_sample=False)
        try:
            check_generation(out, input_ids, GRID)
        except (AssertionError, MalformedImageSpanError):
            broken += 1
    assert broken == 6


def test_prompt_ending_mid_span_is_continued():
    model = tiny_model("llama", 3)
    image_ids = torch.randint(0, 16, (3, 4))
    span = GRID.build_span(image_ids)
    prompt = torch.cat([torch.tensor([BOS, 7, 9]), span[:6]])[None]  # <boi> + 4 ids + <eol>: the next row starts
    out = constrained_generate(model, GRID, prompt, torch.ones_like(prompt), max_new_tokens=GRID.span_length - 6)
    generated = GRID.parse_span(out[0, 3:])
    assert torch.equal(generated[0], image_ids[0])


def test_reused_processor_detects_new_generation():
    model = tiny_model("llama", 5)
    processor = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE, max_images=1)  # counting needs the new prompt's length
    for seed in range(3):
        input_ids, attention_mask = mixed_batch(GRID, seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=40, pad_token_id=PAD,
                             logits_processor=LogitsProcessorList([processor]), **SAMPLING)
        check_generation(out, input_ids, GRID)
        assert count_boi(out, input_ids.shape[1], GRID).max() <= 1


# ---------------------------------------------------------------------- image budget
def count_boi(out, prompt_length, vocab):
    return (out[:, prompt_length:] == vocab.boi_token_id).sum(dim=1)


def test_images_not_allowed_in_text_but_prompt_span_is_completed():
    model = tiny_model("llama", 1)
    input_ids, attention_mask = mixed_batch(GRID, 1)
    processor = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE, allow_images_in_text=False)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=40, pad_token_id=PAD,
                         logits_processor=LogitsProcessorList([processor]), **SAMPLING)
    check_generation(out, input_ids, GRID)
    assert count_boi(out, input_ids.shape[1], GRID).sum() == 0


def test_max_images_limits_spans_the_model_opens():
    opened = []
    for seed in range(4):
        model = tiny_model("llama", seed)
        input_ids, attention_mask = mixed_batch(GRID, seed)
        processor = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE, max_images=1)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=60,
                             pad_token_id=PAD, logits_processor=LogitsProcessorList([processor]), **SAMPLING)
        check_generation(out, input_ids, GRID)
        opened.append(count_boi(out, input_ids.shape[1], GRID))
    opened = torch.cat(opened)
    assert opened.max() == 1 and opened.sum() > 0


# ---------------------------------------------------------------------- scores, one call at a time
def rows_in_each_state():
    """Three rows: in text, before an image id, before <eol>."""
    span = GRID.build_span(torch.arange(12)).tolist()
    return left_pad([[BOS, 5, 6, 7], [BOS, 5] + span[:3], [BOS] + span[:5]])


def test_text_rows_only_lose_image_tokens():
    input_ids, _ = rows_in_each_state()
    scores = torch.randn(3, VOCAB_SIZE)
    out = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)(input_ids, scores.clone())
    forbidden = GRID.is_image_token(torch.arange(VOCAB_SIZE))
    forbidden[[GRID.eoi_token_id, GRID.eol_token_id]] = True
    assert torch.equal(out[0, ~forbidden], scores[0, ~forbidden])
    assert torch.isinf(out[0, forbidden]).all()
    image = GRID.is_image_token(torch.arange(VOCAB_SIZE))
    assert torch.equal(out[1, image], scores[1, image]) and torch.isinf(out[1, ~image]).all()
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [GRID.eol_token_id]


def test_image_temperature_and_top_k_touch_only_image_rows():
    input_ids, _ = rows_in_each_state()
    scores = torch.randn(3, VOCAB_SIZE)
    plain = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)(input_ids, scores.clone())
    warped = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE, image_temperature=0.5, image_top_k=3)(input_ids, scores.clone())
    assert torch.equal(warped[0], plain[0]) and torch.equal(warped[2], plain[2])
    kept = torch.isfinite(warped[1])
    assert kept.sum() == 3
    assert torch.allclose(warped[1, kept], plain[1, kept] / 0.5)
    assert torch.equal(kept, plain[1] >= plain[1].topk(3).values[-1])


def test_eoi_is_forced_after_the_last_row_and_text_resumes():
    span = GRID.build_span(torch.arange(12)).tolist()
    input_ids, _ = left_pad([[BOS] + span[:-1], [BOS] + span])
    out = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)(input_ids, torch.zeros(2, VOCAB_SIZE))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [GRID.eoi_token_id]
    assert torch.isfinite(out[1, GRID.boi_token_id]) and torch.isfinite(out[1, 10])


def test_malformed_open_span_in_prompt_is_refused():
    span = GRID.build_span(torch.arange(12)).tolist()
    bad = torch.tensor([[BOS] + span[:3] + [GRID.eol_token_id]])  # <eol> after two ids of a 4-wide row
    with pytest.raises(ValueError, match="breaks the span grammar"):
        ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)(bad, torch.zeros(1, VOCAB_SIZE))


def test_constructor_and_call_errors():
    with pytest.raises(ValueError, match="vocabulary has only"):
        ImageSpanLogitsProcessor(GRID, 60)
    with pytest.raises(ValueError, match="image_temperature"):
        ImageSpanLogitsProcessor(GRID, VOCAB_SIZE, image_temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size=72"):
        ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)(torch.tensor([[BOS]]), torch.zeros(1, 80))


# ---------------------------------------------------------------------- helpers
def test_find_image_spans():
    span = GRID.build_span(torch.arange(12)).tolist()
    ids = torch.tensor([BOS, 5] + span + [7] + span[:4] + span + [9] + span[:3])
    first, cut, second, last = find_image_spans(ids, GRID)
    assert first == (2, 2 + GRID.span_length)
    assert torch.equal(GRID.parse_span(ids[slice(*second)]), torch.arange(12).view(3, 4))
    with pytest.raises(MalformedImageSpanError):
        GRID.parse_span(ids[slice(*cut)])  # cut short by the next <boi>
    assert last[1] == len(ids)
    with pytest.raises(ValueError, match="1-D"):
        find_image_spans(ids[None], GRID)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"w{i}": i for i in range(4, 50)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("vocab, shape", [(GRID, (3, 4)), (SEQ, (6,))], ids=["grid", "sequence"])
def test_generate_images_shapes(vocab, shape):
    tokenizer = tiny_tokenizer()
    prompts = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14"]
    images = generate_images(tiny_model("llama", 0), tokenizer, vocab, prompts, do_sample=True,
                             num_return_sequences=2, image_top_k=4)
    assert images.shape == (6, *shape)
    assert images.min() >= 0 and images.max() < vocab.codebook_size
    assert tokenizer.padding_side == "right"  # restored
    greedy = generate_images(tiny_model("gpt2", 0), tokenizer, vocab, prompts[:1])
    assert greedy.shape == (1, *shape)


def test_generate_images_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate_images(tiny_model("llama", 0), tokenizer, GRID, ["w5"], max_new_tokens=3)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate_images(tiny_model("llama", 0), tokenizer, GRID, ["w5"])


def test_module_docstring_example_runs():
    result = doctest.testmod(generation)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- settings that break the grammar
@pytest.mark.parametrize("setting", [dict(no_repeat_ngram_size=1), dict(bad_words_ids=[[GRID.eol_token_id]]),
                                     dict(suppress_tokens=[GRID.eoi_token_id])],
                         ids=["no_repeat_ngram_size", "bad_words_ids", "suppress_tokens"])
def test_a_setting_that_bans_the_only_grammatical_token_is_named(setting):
    model = tiny_model("llama", seed=0)
    prompt = torch.tensor([[BOS, 5, 6, GRID.boi_token_id]])
    with pytest.raises(ValueError, match=f"was banned by another constraint.*{next(iter(setting))}"):
        constrained_generate(model, GRID, prompt, torch.ones_like(prompt), max_new_tokens=GRID.span_length - 1,
                             **setting)
    out = constrained_generate(model, GRID, prompt, torch.ones_like(prompt), max_new_tokens=GRID.span_length - 1)
    assert GRID.parse_span(out[0, 3:]).shape == (3, 4)  # without the conflicting setting: well formed


def test_an_all_masked_row_is_caught_in_the_processor_itself():
    processor = ImageSpanLogitsProcessor(GRID, VOCAB_SIZE)
    input_ids = torch.tensor([[BOS, GRID.boi_token_id, *range(GRID.offset, GRID.offset + 4)]])  # next: <eol>
    scores = torch.zeros(1, VOCAB_SIZE)
    scores[0, GRID.eol_token_id] = float("-inf")
    with pytest.raises(ValueError, match=f"row 0: every token the image-span grammar allows next \\(token ids "
                                         f"{GRID.eol_token_id}\\)"):
        processor(input_ids, scores)
    text = torch.full((1, VOCAB_SIZE), float("-inf"))
    processor.reset()
    assert torch.isneginf(processor(torch.tensor([[BOS, 5]]), text)).all()  # text rows are not ours to judge
