"""Every image-vocabulary layout end to end: span grammar, bridge, processor, constrained generation, repair, refusals.

Layouts: fixed and variable-size grids, sequences, residual levels in position- or level-major order with shared or
separate id ranges, factorized sub-tokens, and the unified codebook (image ids are existing text tokens).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.utils import logging as hf_logging

from mllm.generation.logits import (
    EOI,
    EOL,
    IMAGE,
    SIZE,
    TEXT,
    ImageSpanLogitsProcessor,
    find_image_spans,
    generate_images,
)
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import (
    MalformedImageSpanError,
    VisualTokenizer,
    VisualTokenizerConfig,
)
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.quantizers.fsq import split_ids
from tokenizer_bridge.vocab.bridge import add_image_tokens, bridge_llm, resize_llm
from tokenizer_bridge.vocab.image_vocab import ImageVocab
from tokenizer_bridge.vocab.layout import ImageLayout, check_layout_fields

hf_logging.set_verbosity_error()

WORDS = "a red green blue circle square draw on the left right top bottom big small"
PAD, BOS = 0, 1
UNICODE_IDS = [4, 5, 6, 7, 8, 9, 10, 11]  # existing word tokens reused as the 8 image ids

LAYOUTS = {
    "grid": dict(codebook_size=16, grid_size=(2, 3)),
    "sequence": dict(codebook_size=16, layout="sequence", num_tokens=5),
    "levels_position_shared": dict(codebook_size=8, grid_size=(2, 3), num_levels=3),
    "levels_position_separate": dict(codebook_size=8, grid_size=(2, 3), num_levels=2, separate_level_ranges=True),
    "levels_level_shared": dict(codebook_size=8, grid_size=(2, 3), num_levels=2, level_order="level"),
    "levels_level_separate": dict(codebook_size=8, grid_size=(2, 3), num_levels=3, level_order="level",
                                  separate_level_ranges=True),
    "sequence_levels_level": dict(codebook_size=8, layout="sequence", num_tokens=4, num_levels=2,
                                  level_order="level", separate_level_ranges=True),
    "factorized": dict(codebook_size=64, grid_size=(2, 3), factors=[8, 8]),
    "factorized_levels": dict(codebook_size=48, layout="sequence", num_tokens=3, factors=[4, 12], num_levels=2,
                              separate_level_ranges=True),
    "variable": dict(codebook_size=16, grid_size=(3, 4), variable_size=True),
    "variable_levels": dict(codebook_size=8, grid_size=(3, 3), variable_size=True, num_levels=2,
                            level_order="level", separate_level_ranges=True),
    "unicode": dict(codebook_size=8, grid_size=(2, 3), token_ids=UNICODE_IDS),
    "unicode_variable_levels": dict(codebook_size=8, grid_size=(3, 3), token_ids=UNICODE_IDS, variable_size=True,
                                    num_levels=2),
}


def word_tokenizer():
    return build_word_tokenizer([WORDS])


def bridged_vocab(name: str) -> tuple:
    tokenizer = word_tokenizer()
    return tokenizer, add_image_tokens(tokenizer, **LAYOUTS[name])


def sizes_of(vocab: ImageVocab) -> list[tuple[int, int]]:
    if vocab.layout == "sequence":
        return [(1, vocab.num_tokens)]
    if vocab.variable_size:
        return [(1, 1), (2, 3), tuple(vocab.grid_size), (vocab.grid_size[0], 1)]
    return [tuple(vocab.grid_size)]


def random_ids(vocab: ImageVocab, h: int, w: int, generator=None, batch=()) -> torch.Tensor:
    shape = (w,) if vocab.layout == "sequence" else (h, w)
    levels = (vocab.num_levels,) if vocab.num_levels > 1 else ()
    return torch.randint(0, vocab.codebook_size, (*batch, *shape, *levels), generator=generator)


# ---------------------------------------------------------------------- independent spelling of the grammar
def class_sets(vocab: ImageVocab, h: int, w: int) -> list[set]:
    """Allowed token ids at each position after <boi> (after the size tokens), written out with plain loops."""
    factors = vocab.factors or [vocab.codebook_size]

    def ids(level: int, part: int) -> set:
        if vocab.token_ids is not None:
            return set(vocab.token_ids)
        start = vocab.offset + (sum(factors) * level if vocab.separate_level_ranges else 0) + sum(factors[:part])
        return set(range(start, start + factors[part]))

    rows, cols = (h, w) if vocab.layout == "grid" else (1, vocab.num_tokens)
    eol = [{vocab.eol_token_id}] if vocab.layout == "grid" else []
    out = []
    if vocab.level_order == "position":
        for _ in range(rows):
            out += [ids(l, j) for _ in range(cols) for l in range(vocab.num_levels) for j in range(len(factors))]
            out += eol
    else:
        for l in range(vocab.num_levels):
            for _ in range(rows):
                out += [ids(l, j) for _ in range(cols) for j in range(len(factors))] + eol
    return out + [{vocab.eoi_token_id}]


def expected_at(vocab: ImageVocab, after_boi: list[int]) -> set:
    """The set of tokens allowed next, given the tokens of the open span so far."""
    if not vocab.variable_size:
        return class_sets(vocab, *sizes_of(vocab)[0])[len(after_boi)]
    height, width = vocab.grid_size
    first = vocab.size_token_offset
    if len(after_boi) == 0:
        return set(range(first, first + height))
    if len(after_boi) == 1:
        return set(range(first + height, first + height + width))
    h, w = after_boi[0] - first + 1, after_boi[1] - first - height + 1
    return class_sets(vocab, h, w)[len(after_boi) - 2]


def span_only_tokens(vocab: ImageVocab) -> set:
    out = {vocab.eoi_token_id} | set(vocab.size_token_ids)
    out |= {vocab.eol_token_id} if vocab.eol_token_id is not None else set()
    return out if vocab.token_ids is not None else out | set(range(*vocab.id_range))


def walk(tokens: list[int], vocab: ImageVocab):
    """Assert the row follows the grammar; return None if it ends in text, else the open span's tokens so far."""
    span, forbidden = None, span_only_tokens(vocab)
    for i, token in enumerate(tokens):
        if span is None:
            assert token not in forbidden, f"span-only token {token} in text at {i}: {tokens}"
            span = [] if token == vocab.boi_token_id else None
            continue
        allowed = expected_at(vocab, span)
        assert token in allowed, f"span position {len(span)} holds {token}, allowed {sorted(allowed)[:8]}: {tokens}"
        span = None if token == vocab.eoi_token_id else span + [token]
    return span


# ---------------------------------------------------------------------- span round trips
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_span_round_trip_every_layout(name):
    tokenizer, vocab = bridged_vocab(name)
    generator = torch.Generator().manual_seed(0)
    for h, w in sizes_of(vocab):
        image_ids = random_ids(vocab, h, w, generator)
        span = vocab.build_span(image_ids)
        assert span.shape == (vocab.span_length_of(h, w),)
        assert walk(span.tolist(), vocab) is None  # the independent grammar accepts it
        assert torch.equal(vocab.parse_span(span), image_ids)
        assert vocab.repair_span(span).repairs == []
        batch = random_ids(vocab, h, w, generator, batch=(3,))
        spans = vocab.build_spans(batch)
        assert torch.equal(spans, torch.stack([vocab.build_span(ids) for ids in batch]))
        names = tokenizer.convert_ids_to_tokens(span.tolist())
        assert "<unk>" not in names and names[0] == "<boi>" and names[-1] == "<eoi>"
    assert vocab.span_length == max(vocab.span_length_of(h, w) for h, w in sizes_of(vocab))
    again = ImageVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and torch.equal(again.build_span(image_ids), span)


def test_exact_token_order_of_levels():
    base = dict(offset=100, codebook_size=4, boi_token_id=90, eoi_token_id=91, eol_token_id=92, grid_size=(1, 2),
                num_levels=2)
    image_ids = torch.tensor([[[1, 2], [3, 0]]])  # (h=1, w=2, L=2)
    position = ImageVocab(**base, separate_level_ranges=True)
    assert position.build_span(image_ids).tolist() == [90, 101, 106, 103, 104, 92, 91]
    level = ImageVocab(**base, level_order="level", separate_level_ranges=True)
    assert level.build_span(image_ids).tolist() == [90, 101, 103, 92, 106, 104, 92, 91]
    shared = ImageVocab(**base, level_order="level")
    assert shared.build_span(image_ids).tolist() == [90, 101, 103, 92, 102, 100, 92, 91]
    assert (position.num_image_tokens, shared.num_image_tokens) == (8, 4)


def test_factorized_sub_tokens_follow_split_ids():
    tokenizer = word_tokenizer()
    n_text = len(tokenizer)
    vocab = add_image_tokens(tokenizer, 2**18, grid_size=(1, 2), factors=[2**9, 2**9])
    assert len(tokenizer) == n_text + 3 + 2 * 2**9  # not 2**18
    image_ids = torch.tensor([[5 + 512 * 7, 2**18 - 1]])
    low, high = split_ids(image_ids, [2**9, 2**9]).unbind(-1)
    assert (int(low[0, 0]), int(high[0, 0])) == (5, 7)  # sub-id 0 = low bits
    span = vocab.build_span(image_ids).tolist()
    assert span[1:3] == [vocab.offset + 5, vocab.offset + 512 + 7]
    assert tokenizer.convert_ids_to_tokens(span[1:3]) == ["<img_F0_5>", "<img_F1_7>"]
    assert torch.equal(vocab.parse_span(torch.tensor(span)), image_ids)
    with pytest.raises(MalformedImageSpanError, match="valid sub-token 1 token"):
        vocab.parse_span(torch.tensor(span[:2] + [vocab.offset + 1] + span[3:]))  # sub-token 0 id where 1 is expected


def test_variable_grid_spells_its_size():
    tokenizer, vocab = bridged_vocab("variable")
    span = vocab.build_span(torch.tensor([[3], [7]]))  # h=2, w=1
    names = tokenizer.convert_ids_to_tokens(span.tolist())
    assert names == ["<boi>", "<h_2>", "<w_1>", "<img_3>", "<eol>", "<img_7>", "<eol>", "<eoi>"]
    with pytest.raises(MalformedImageSpanError, match="<h_k> <w_k>"):
        vocab.parse_span(torch.cat([span[:1], span[3:]]))
    with pytest.raises(ValueError, match="exceeds the largest grid"):
        vocab.build_span(torch.zeros(4, 1, dtype=torch.long))


def test_unicode_maps_through_the_table():
    tokenizer, vocab = bridged_vocab("unicode")
    assert len(tokenizer) == vocab.text_vocab_size + 3  # only <boi> <eoi> <eol> were added
    image_ids = torch.tensor([[0, 7, 3], [1, 1, 5]])
    span = vocab.build_span(image_ids)
    assert span[1:4].tolist() == [UNICODE_IDS[0], UNICODE_IDS[7], UNICODE_IDS[3]]
    assert torch.equal(vocab.input_ids_to_image_ids(vocab.image_ids_to_input_ids(image_ids)), image_ids)
    with pytest.raises(MalformedImageSpanError, match="not an image token"):
        vocab.parse_span(torch.cat([span[:1], torch.tensor([13]), span[2:]]))  # "left" (13) is not in the table
    reused = word_tokenizer()
    size = len(reused)
    vocab = add_image_tokens(reused, 8, grid_size=(2, 3), token_ids=UNICODE_IDS,
                             special_tokens=["top", "bottom", "big"])
    assert len(reused) == size and vocab.special_token_ids == reused.convert_tokens_to_ids(["top", "bottom", "big"])


def test_id_mapping_with_levels_and_factors():
    _, vocab = bridged_vocab("factorized_levels")
    image_ids = torch.randint(0, 48, (5, 3, 2))  # (..., positions, L)
    tokens = vocab.image_ids_to_input_ids(image_ids)
    assert tokens.shape == (5, 3, 4)  # L * F tokens per position, position-major
    assert torch.equal(vocab.input_ids_to_image_ids(tokens), image_ids)
    with pytest.raises(MalformedImageSpanError, match="not an image token of its image class"):
        vocab.input_ids_to_image_ids(tokens.flip(-1))


def test_strict_errors_name_level_rows():
    _, vocab = bridged_vocab("levels_level_separate")
    span = vocab.build_span(torch.zeros(2, 3, 3, dtype=torch.long))
    row = 1 + 2 * (3 + 1)  # first token of level 1
    broken = span.clone()
    broken[row + 3] = vocab.offset  # level 1, row 0: <eol> replaced by an image token
    with pytest.raises(MalformedImageSpanError, match="row 0 of level 1 of the image span does not end with <eol>"):
        vocab.parse_span(broken)
    broken = span.clone()
    broken[row] = vocab.offset  # a level-0 id where level 1 is expected
    with pytest.raises(MalformedImageSpanError, match="not a valid level 1 token"):
        vocab.parse_span(broken)


# ---------------------------------------------------------------------- lenient parsing
def test_repair_reports_what_it_did():
    _, vocab = bridged_vocab("levels_position_separate")
    image_ids = torch.randint(0, 8, (2, 3, 2))
    span = vocab.build_span(image_ids)
    with pytest.raises(MalformedImageSpanError, match="not closed by <eoi>"):
        vocab.parse_span(span[:-4])
    parsed = vocab.repair_span(span[:-4])  # last row lost its last position (2 tokens) and <eol>, no <eoi>
    assert parsed.image_ids.shape == (2, 3, 2)
    assert torch.equal(parsed.image_ids[0], image_ids[0]) and torch.equal(parsed.image_ids[1, :2], image_ids[1, :2])
    assert parsed.repairs == ["added the missing <eoi>", "2 missing image tokens filled (row 1)"]
    assert parsed.report.startswith("repaired: added the missing <eoi>")
    assert torch.equal(vocab.parse_span(span[:-4], lenient=True), parsed.image_ids)

    text_inside = span.clone()
    text_inside[2] = 5  # a text token where an image token is expected
    long_row = torch.cat([span[:7], span[1:3], span[7:]])  # row 0 gets one position too many
    assert vocab.repair_span(text_inside).repairs == ["1 invalid image token replaced (row 0)"]
    assert vocab.repair_span(long_row).repairs == ["2 extra tokens dropped"]
    assert torch.equal(vocab.repair_span(long_row).image_ids, image_ids)


def test_repair_fills_with_the_most_frequent_id_and_refuses_sizeless_spans():
    _, vocab = bridged_vocab("variable")
    image_ids = torch.tensor([[4, 4, 9], [4, 1, 2]])
    span = vocab.build_span(image_ids)
    parsed = vocab.repair_span(span[:-3])  # <boi> h w row0 <eol> 4 1
    assert parsed.image_ids.tolist() == [[4, 4, 9], [4, 1, 4]]
    with pytest.raises(MalformedImageSpanError, match="size tokens"):
        vocab.repair_span(span[:1])


# ---------------------------------------------------------------------- refusals
def test_overlapping_or_oversized_vocabularies_are_refused():
    base = dict(codebook_size=8, boi_token_id=40, eoi_token_id=41, eol_token_id=42, grid_size=(2, 2))
    with pytest.raises(ValueError, match="overlap existing text tokens"):
        ImageVocab(offset=30, text_vocab_size=40, **base)
    with pytest.raises(ValueError, match="overlaps the image ids"):
        ImageVocab(offset=38, **base)
    with pytest.raises(ValueError, match="must be existing text tokens"):
        ImageVocab(offset=None, token_ids=list(range(36, 44)), text_vocab_size=40, **base)
    with pytest.raises(ValueError, match="overlaps the image ids"):
        ImageVocab(offset=None, token_ids=list(range(37, 45)), **base)
    with pytest.raises(ValueError, match="size tokens"):
        ImageVocab(offset=50, variable_size=True, size_token_offset=48, **base)
    with pytest.raises(ValueError, match="multiply to"):
        ImageVocab(offset=50, factors=[2, 2], **base)
    with pytest.raises(ValueError, match="cannot be combined"):
        ImageVocab(offset=None, token_ids=list(range(8)), factors=[2, 4], **base)
    vocab = ImageVocab(offset=50, num_levels=2, separate_level_ranges=True, factors=[2, 4], **base)
    assert vocab.max_token_id == 50 + 2 * 6 - 1
    vocab.check_fits(62)
    with pytest.raises(ValueError, match="vocabulary has only 61 rows"):
        vocab.check_fits(61)
    with pytest.raises(ValueError, match="vocabulary has only"):
        ImageSpanLogitsProcessor(vocab, 61)


def test_bridge_refuses_bad_options_before_touching_the_tokenizer():
    tokenizer = word_tokenizer()
    size = len(tokenizer)
    with pytest.raises(ValueError, match="level_order"):
        add_image_tokens(tokenizer, 8, grid_size=(2, 2), num_levels=2, level_order="depth")
    with pytest.raises(ValueError, match="must be existing text tokens"):
        add_image_tokens(tokenizer, 4, grid_size=(2, 2), token_ids=[1, 2, 3, 500])
    with pytest.raises(ValueError, match="not tokens of the tokenizer"):
        add_image_tokens(tokenizer, 4, grid_size=(2, 2), special_tokens=["<x>", "<y>", "<z>"])
    with pytest.raises(ValueError, match="variable_size applies to the grid"):
        add_image_tokens(tokenizer, 4, layout="sequence", num_tokens=3, variable_size=True)
    model = tiny_llm(size)
    with pytest.raises(ValueError, match=r"init tensor must have shape \(image tokens, hidden\) = \(24, 16\)"):
        bridge_llm(model, tokenizer, 16, grid_size=(2, 2), factors=[4, 4], num_levels=3, separate_level_ranges=True,
                   init=torch.zeros(16, 16))
    assert len(tokenizer) == size


def test_bridge_llm_sizes_rows_for_each_layout():
    tokenizer = word_tokenizer()
    n_text = len(tokenizer)
    model = tiny_llm(n_text)
    init = torch.randn(24, 16)
    vocab = bridge_llm(model, tokenizer, 16, grid_size=(2, 2), factors=[4, 4], num_levels=3,
                       separate_level_ranges=True, variable_size=True, init=init)
    assert vocab.size_token_ids == list(range(n_text + 3, n_text + 7)) and vocab.offset == n_text + 7
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == vocab.offset + 24
    torch.testing.assert_close(model.get_input_embeddings().weight[vocab.offset:], init)
    unicode_tokenizer = word_tokenizer()
    unicode_model = tiny_llm(n_text)
    vocab = bridge_llm(unicode_model, unicode_tokenizer, 8, grid_size=(2, 2), token_ids=UNICODE_IDS,
                       special_tokens=["top", "bottom", "big"])
    assert unicode_model.get_input_embeddings().weight.shape[0] == n_text == len(unicode_tokenizer)
    with pytest.raises(ValueError, match="unified-codebook"):
        resize_llm(unicode_model, vocab, init=torch.zeros(8, 16))


# ---------------------------------------------------------------------- one layout declaration
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_an_image_layout_and_its_keywords_bridge_the_same_vocab(name):
    layout = ImageLayout(**LAYOUTS[name])
    from_layout = add_image_tokens(word_tokenizer(), layout, tokenizer_fingerprint="f" * 8)
    from_keywords = add_image_tokens(word_tokenizer(), tokenizer_fingerprint="f" * 8, **LAYOUTS[name])
    assert from_layout == from_keywords and from_layout.image_layout == layout
    assert isinstance(from_layout, ImageLayout) and from_layout.span_length == layout.span_length
    assert from_layout.num_image_tokens == layout.num_image_tokens
    tokenizer = word_tokenizer()
    model = tiny_llm(len(tokenizer))
    assert bridge_llm(model, tokenizer, layout, tokenizer_fingerprint="f" * 8) == from_layout
    assert model.get_input_embeddings().weight.shape[0] == from_layout.max_token_id + 1


def test_an_image_layout_is_checked_once_wherever_it_comes_from():
    with pytest.raises(TypeError, match="not both"):
        add_image_tokens(word_tokenizer(), ImageLayout(codebook_size=8, grid_size=(2, 2)), num_levels=2)
    with pytest.raises(TypeError, match="codebook_size given twice"):
        add_image_tokens(word_tokenizer(), 8, codebook_size=8, grid_size=(2, 2))
    with pytest.raises(ValueError, match="level_order must be one of"):
        ImageLayout(codebook_size=8, grid_size=(2, 2), level_order="depth")
    with pytest.raises(ValueError, match=r"special_tokens must name 2 existing tokens \(<boi>, <eoi>\)"):
        ImageLayout(codebook_size=8, layout="sequence", num_tokens=3, special_tokens=["top", "bottom", "big"])
    layout = ImageLayout(codebook_size=8, layout="sequence", grid_size=(2, 2), budgets=[4, 2, 4])
    assert (layout.budgets, layout.num_tokens, layout.grid_size) == ([2, 4], 4, None)  # normalised, other size cleared
    # a partial layout (the visual tokenizer's part still unknown) is checked as far as it goes
    assert check_layout_fields({"layout": "grid", "factors": (4, 4)}) == {"layout": "grid", "factors": [4, 4]}
    with pytest.raises(ValueError, match="variable_size applies to the grid layout only"):
        check_layout_fields({"layout": "sequence", "variable_size": True})
    with pytest.raises(ValueError, match="multiply to"):
        check_layout_fields({"codebook_size": 64, "factors": [4, 4]})


# ---------------------------------------------------------------------- processor
def tiny_llm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def processor_for(name: str, visual_tokenizer=None) -> UnifiedProcessor:
    tokenizer = word_tokenizer()
    options = dict(LAYOUTS[name])
    if visual_tokenizer is not None:
        options["tokenizer_fingerprint"] = visual_tokenizer.fingerprint()
    vocab = add_image_tokens(tokenizer, **options)
    return UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab, visual_tokenizer=visual_tokenizer)


@pytest.mark.parametrize("name", ["variable_levels", "sequence_levels_level", "factorized", "unicode_variable_levels"])
def test_processor_round_trip_with_mixed_sizes(name):
    processor = processor_for(name)
    vocab = processor.image_vocab
    sizes = sizes_of(vocab)
    second = sizes[1 % len(sizes)]
    images = [[random_ids(vocab, *sizes[0])], [random_ids(vocab, *sizes[-1]), random_ids(vocab, *second)]]
    texts = ["draw a red circle <image>", "<image> on the left <image> big"]
    batch = processor(target=texts, image_ids=images, return_loss_masks=True, padding=True, return_tensors="pt")
    for row, expected in zip(batch["input_ids"], images):
        decoded = processor.decode_image_ids(row)  # right padding: the trailing pads are text
        assert len(decoded) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(decoded, expected))
    spans = [find_image_spans(row, vocab) for row in batch["input_ids"]]
    image_tokens = sum(end - start for row in spans for start, end in row)
    assert int(batch["image_token_mask"].sum()) == image_tokens


def test_processor_accepts_batched_level_tensors():
    processor = processor_for("levels_level_separate")
    image_ids = torch.randint(0, 8, (2, 2, 3, 3))  # (n, h, w, L)
    batch = processor(target=["<image> red <image>"], image_ids=image_ids, padding=True, return_tensors="pt")
    decoded = processor.decode_image_ids(batch["input_ids"][0])
    assert torch.equal(torch.stack(decoded), image_ids)
    flat = processor(target=["<image> red <image>"], image_ids=image_ids.reshape(2, 6, 3), padding=True, return_tensors="pt")
    assert torch.equal(flat["input_ids"], batch["input_ids"])


def test_unicode_text_and_images_share_tokens():
    processor = processor_for("unicode")
    image_ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    batch = processor(target=["a green circle <image> the top"], image_ids=[image_ids], add_eos=False, padding=True, return_tensors="pt")
    pieces = processor.decode_image_ids(batch["input_ids"][0])
    assert len(pieces) == 1 and torch.equal(pieces[0], image_ids)
    text = processor.tokenizer.decode(batch["input_ids"][0][:4], skip_special_tokens=True)
    assert text == "a green circle"  # words that are also image ids stay text outside spans


def residual_visual_tokenizer() -> VisualTokenizer:
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=8, downsample=8, image_size=32,
                                   residual_levels=2, kmeans_init=False)
    return VisualTokenizer(config).eval()


def test_lenient_decode_repairs_variable_levels_to_pixels():
    visual_tokenizer = residual_visual_tokenizer()
    processor = processor_for("variable_levels", visual_tokenizer)
    vocab = processor.image_vocab
    small, big = random_ids(vocab, 1, 2), random_ids(vocab, 3, 3)
    ids = processor(target=["red <image> blue <image>"], image_ids=[small, big], add_eos=False, padding=True, return_tensors="pt")["input_ids"][0]
    pieces = processor.decode(ids)
    assert [type(p) for p in pieces] == [str, Image.Image, str, Image.Image]
    assert pieces[1].size == (16, 8) and pieces[3].size == (24, 24)  # (width, height) = 8 px per position
    truncated = ids[:-5]  # the big image loses its last row (level 1, row 2: 3 ids + <eol>) and <eoi>
    with pytest.raises(MalformedImageSpanError, match="not closed by <eoi>"):
        processor.decode(truncated)
    assert processor.decode(truncated, lenient=True)[-1].startswith("[malformed image:")
    repaired = processor.decode(truncated, repair=True)
    assert repaired[-2] == "[repaired image: added the missing <eoi>; 3 missing image tokens filled (row 5)]"
    assert isinstance(repaired[-1], Image.Image) and repaired[-1].size == (24, 24)
    fixed = processor.decode_image_ids(truncated, repair=True)[-1]
    assert fixed.shape == (3, 3, 2) and torch.equal(fixed[:, :, 0], big[:, :, 0])
    assert torch.equal(fixed[:2, :, 1], big[:2, :, 1])
    with pytest.raises(ValueError, match="residual levels"):
        processor_for("unicode", visual_tokenizer)  # 8 codes but one level


# ---------------------------------------------------------------------- generation
def biased_llm(vocab: ImageVocab, vocab_size: int, seed: int):
    """A random tiny Llama pushed toward every span token and toward opening spans, so constraints do real work."""
    model = tiny_llm(vocab_size)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    bias = torch.randn(vocab_size) * 3
    bias[vocab.image_token_ids()] += 3
    bias[vocab.special_token_ids] += 7
    bias[vocab.size_token_ids] += 5 if vocab.size_token_ids else 0
    bias[vocab.boi_token_id] -= 2
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    return model


def prompts(vocab: ImageVocab, rng: random.Random) -> list[list[int]]:
    text = lambda: [rng.randrange(4, 18) for _ in range(rng.randint(1, 4))]  # noqa: E731

    def span():
        h, w = rng.choice(sizes_of(vocab))
        return vocab.build_span(random_ids(vocab, h, w)).tolist()

    partial = span()
    rows = [
        [BOS] + text(),
        [BOS] + text() + [vocab.boi_token_id],
        [BOS] + text() + span() + text(),
        [BOS] + text() + span() + [vocab.boi_token_id],
        [BOS] + text() + partial[: rng.randint(2, len(partial) - 1)],
        [BOS] + partial[: rng.randint(2, len(partial) - 1)],
    ]
    if vocab.variable_size:  # a prompt that fixes a size of its own
        rows[1] += vocab.size_tokens(*rng.choice(sizes_of(vocab)))
    return rows


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def check_rows(out: torch.Tensor, input_ids: torch.Tensor, vocab: ImageVocab, copies: int) -> list[tuple]:
    """Every row follows the grammar and closes the span its prompt opened; return the sizes of complete spans."""
    sizes = []
    for row, sequence in enumerate(out.tolist()):
        walk(sequence, vocab)
        prompt = input_ids[row // copies].tolist()
        if walk(prompt, vocab) is not None:
            assert vocab.eoi_token_id in sequence[len(prompt):], f"prompt's span left open: {sequence}"
        for start, end in find_image_spans(torch.tensor(sequence), vocab):
            if sequence[end - 1] == vocab.eoi_token_id:
                sizes.append(tuple(vocab.parse_span(torch.tensor(sequence[start:end])).shape))
    return sizes


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_generation_is_well_formed_for_every_layout(name):
    tokenizer, vocab = bridged_vocab(name)
    width = len(tokenizer) + 2  # logits wider than the tokenizer
    sizes = []
    for seed in range(5):
        model = biased_llm(vocab, width, seed)
        input_ids, attention_mask = left_pad(prompts(vocab, random.Random(seed)))
        for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=0, temperature=1.5, num_return_sequences=2)):
            processor = ImageSpanLogitsProcessor(vocab, width)
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=PAD,
                                 max_new_tokens=vocab.span_length + 4,
                                 logits_processor=LogitsProcessorList([processor]), **kwargs)
            sizes += check_rows(out, input_ids, vocab, kwargs.get("num_return_sequences", 1))
    assert len(sizes) >= 20  # spans really were generated and parsed
    if vocab.variable_size:
        assert len(set(sizes)) > 1  # rows of one batch followed different span lengths


def test_unconstrained_biased_models_do_misbehave():
    """Guard for the test above: without the processor the biased model breaks the grammar."""
    tokenizer, vocab = bridged_vocab("variable_levels")
    model = biased_llm(vocab, len(tokenizer), 0)
    input_ids, attention_mask = left_pad(prompts(vocab, random.Random(0)))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=PAD, max_new_tokens=12,
                         do_sample=False)
    with pytest.raises(AssertionError):
        check_rows(out, input_ids, vocab, 1)


def test_next_categories_per_layout_state():
    tokenizer, vocab = bridged_vocab("variable_levels")
    span = vocab.build_span(random_ids(vocab, 1, 2)).tolist()  # <boi> <h_1> <w_2> a b <eol> c d <eol> <eoi>
    rows = [[BOS, 5], [BOS] + span[:1], [BOS] + span[:2], [BOS] + span[:3], [BOS] + span[:5], [BOS] + span[:9],
            [BOS] + span]
    input_ids, _ = left_pad(rows)
    processor = ImageSpanLogitsProcessor(vocab, len(tokenizer))
    assert processor.next_categories(input_ids).tolist() == [TEXT, SIZE, SIZE, IMAGE, EOL, EOI, TEXT]
    assert processor.in_image_span(input_ids).tolist() == [False] + [True] * 5 + [False]
    scores = processor(input_ids, torch.zeros(len(rows), len(tokenizer)))
    level0 = set(range(vocab.offset, vocab.offset + 8))
    assert set(torch.isfinite(scores[3]).nonzero().flatten().tolist()) == level0
    assert set(torch.isfinite(scores[1]).nonzero().flatten().tolist()) == set(vocab.size_token_ids[:3])


def test_malformed_variable_prompt_is_refused():
    tokenizer, vocab = bridged_vocab("variable")
    span = vocab.build_span(random_ids(vocab, 2, 2)).tolist()
    bad = torch.tensor([[BOS] + span[:2] + [span[1]]])  # a height token where the width token belongs
    with pytest.raises(ValueError, match="breaks the span grammar"):
        ImageSpanLogitsProcessor(vocab, len(tokenizer))(bad, torch.zeros(1, len(tokenizer)))


def test_generate_images_variable_size():
    tokenizer, vocab = bridged_vocab("variable_levels")
    model = biased_llm(vocab, len(tokenizer), 1)
    images = generate_images(model, tokenizer, vocab, ["red circle", "blue"], image_size=(2, 3), do_sample=True)
    assert images.shape == (2, 2, 3, 2) and int(images.max()) < vocab.codebook_size
    with pytest.raises(ValueError, match="image_size"):
        generate_images(model, tokenizer, vocab, ["red"])


@pytest.mark.parametrize("name", ["variable", "variable_levels"])
def test_variable_size_state_table_matches_arithmetic(name, monkeypatch):
    import mllm.generation.logits as generation

    tokenizer, vocab = bridged_vocab(name)
    rng = random.Random(0)
    rows = [row for seed in range(4) for row in prompts(vocab, random.Random(seed))]
    rows += [[BOS] + vocab.build_span(random_ids(vocab, h, w)).tolist()[:k] for h, w in sizes_of(vocab)
             for k in range(1, vocab.span_length_of(h, w) + 1)]
    rng.shuffle(rows)
    input_ids, _ = left_pad(rows)
    table = ImageSpanLogitsProcessor(vocab, len(tokenizer))
    monkeypatch.setattr(generation, "MAX_SIZE_TABLE", 0)
    arithmetic = ImageSpanLogitsProcessor(vocab, len(tokenizer))
    assert table.size_states is not None and arithmetic.size_states is None
    assert torch.equal(table.next_states(input_ids), arithmetic.next_states(input_ids))
