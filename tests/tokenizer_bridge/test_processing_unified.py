"""UnifiedProcessor (placeholder expansion, labels, masks, padding, decode, save/load) and the mllm bundle."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM

from mllm.bundle.bundle import load_bundle, save_bundle
from mllm.text_tokenizers import build_sentencepiece_tokenizer, build_word_tokenizer
from tokenizer_bridge import (
    MalformedImageSpanError,
    VisualTokenizer,
    VisualTokenizerConfig,
)
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

# Idempotent; `import tokenizer_bridge` is meant to do the same.
AutoProcessor.register(VisualTokenizerConfig, UnifiedProcessor, exist_ok=True)

WORDS = "a red green blue circle square draw describe on the left right and"
GRID = (4, 4)  # 32 px images, downsample 8
SPAN = GRID[0] * (GRID[1] + 1) + 2


def tiny_visual_tokenizer(seed: int = 0) -> VisualTokenizer:
    torch.manual_seed(seed)
    config = VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=32, downsample=8, image_size=32)
    return VisualTokenizer(config).eval()


def tiny_llm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def bridged(add_bos: bool = True):
    tokenizer = build_word_tokenizer([WORDS], add_bos=add_bos)
    visual_tokenizer = tiny_visual_tokenizer()
    model = tiny_llm(len(tokenizer))
    vocab = bridge_llm(model, tokenizer, 32, grid_size=GRID, tokenizer_fingerprint=visual_tokenizer.fingerprint())
    processor = UnifiedProcessor(
        VisualTokenizerImageProcessor(size=32), tokenizer, vocab, visual_tokenizer=visual_tokenizer
    )
    return model, processor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs are ~100x slower with 2 intra-op threads on a busy 2-core machine (thread oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    return bridged()


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


def words(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def image_ids_of(processor, images) -> torch.Tensor:
    pixel_values = processor.image_processor.preprocess(images)["pixel_values"]
    return processor.visual_tokenizer.encode(pixel_values)  # (n, 4, 4)


def spans_of(processor, images) -> list[list[int]]:
    return [processor.image_vocab.build_span(ids).tolist() for ids in image_ids_of(processor, images)]


# ---------------------------------------------------------------------------------------------- encoding
def test_placeholders_expand_to_the_exact_span_in_place(setup, images):
    _, processor = setup
    tok = processor.tokenizer
    out = processor(target=["a red <image> circle on the <image> left"], images=images[:2], padding=True, return_tensors="pt")
    spans = spans_of(processor, images[:2])
    expected = [tok.bos_token_id] + words(processor, "a red") + spans[0] + words(processor, "circle on the")
    expected += spans[1] + words(processor, "left") + [tok.eos_token_id]
    assert out["input_ids"][0].tolist() == expected
    assert len(spans[0]) == SPAN


def test_labels_ignore_prompt_and_padding(setup, images):
    _, processor = setup
    out = processor(text=["<image> describe", "draw a red circle on the left"], target=["a red circle", "<image>"],
                    images=images[:2], padding=True, return_tensors="pt")
    ids, labels, attention = out["input_ids"], out["labels"], out["attention_mask"]
    targets = [words(processor, "a red circle"), spans_of(processor, images[1:2])[0]]
    for row, target in enumerate(targets):
        supervised = labels[row] != -100
        assert labels[row][supervised].tolist() == target + [processor.tokenizer.eos_token_id]
        assert torch.equal(labels[row][supervised], ids[row][supervised])
        assert not supervised[attention[row] == 0].any()  # padding never supervised
        n = int(attention[row].sum())
        assert supervised[:n].tolist() == [False] * (n - len(target) - 1) + [True] * (len(target) + 1)


def test_loss_masks_partition_the_targets(setup, images):
    _, processor = setup
    out = processor(text=["<image> describe", "draw a red circle"], target=["a red circle", "<image>"],
                    images=images[:2], return_loss_masks=True, padding=True, return_tensors="pt")
    supervised = out["labels"] != -100
    text_mask, image_mask = out["text_loss_mask"], out["image_loss_mask"]
    assert not (text_mask & image_mask).any()
    assert torch.equal(text_mask | image_mask, supervised)
    # captioning sample: the image is in the prompt, so no image loss; text-to-image: the whole span is image loss
    assert not image_mask[0].any() and int(text_mask[0].sum()) == len(words(processor, "a red circle")) + 1
    assert int(image_mask[1].sum()) == SPAN and int(text_mask[1].sum()) == 1  # + eos
    assert out["image_token_mask"].sum(dim=1).tolist() == [SPAN, SPAN]
    span_ids = out["input_ids"][out["image_token_mask"]]
    vocab = processor.image_vocab
    assert (vocab.is_image_token(span_ids) | torch.isin(span_ids, torch.tensor(vocab.special_token_ids))).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_padding(setup, images, side):
    _, processor = setup
    texts, prompts = ["a red circle", "<image>"], ["describe", "draw a blue square on the right"]
    batch = processor(text=prompts, target=texts, image_ids=image_ids_of(processor, images[:1]), padding_side=side, padding=True, return_tensors="pt")
    pad = processor.tokenizer.pad_token_id
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        single = processor(text=prompt, target=text, image_ids=image_ids_of(processor, images[:1]) if row else None, padding=True, return_tensors="pt")
        n, width = single["input_ids"].shape[1], batch["input_ids"].shape[1]
        keep = slice(0, n) if side == "right" else slice(width - n, width)
        padded = slice(n, width) if side == "right" else slice(0, width - n)
        for name in ("input_ids", "labels"):
            assert torch.equal(batch[name][row, keep], single[name][0])
        assert batch["attention_mask"][row, keep].eq(1).all() and batch["attention_mask"][row, padded].eq(0).all()
        assert batch["input_ids"][row, padded].eq(pad).all() and batch["labels"][row, padded].eq(-100).all()


def test_padding_options(setup):
    _, processor = setup
    out = processor(target=["a red circle", "a"], padding="max_length", max_length=12, return_tensors="pt")
    assert out["input_ids"].shape == (2, 12)
    lists = processor(target=["a red circle", "a"], padding=False, return_tensors=None)
    assert [len(row) for row in lists["input_ids"]] == [5, 3]  # bos + words + eos
    with pytest.raises(ValueError, match="max_length=4"):
        processor(target=["a red circle"], padding="max_length", max_length=4, return_tensors="pt")


def test_generation_inputs_have_no_labels_and_no_eos(setup):
    _, processor = setup
    out = processor(text=["draw a red circle", "draw"], padding_side="left", padding=True, return_tensors="pt")
    assert "labels" not in out
    assert out["input_ids"][0].tolist() == [processor.tokenizer.bos_token_id] + words(processor, "draw a red circle")
    assert out["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]


def test_special_tokens_added_once_at_the_start():
    _, no_bos = bridged(add_bos=False)
    assert no_bos(target="a red", padding=True, return_tensors="pt")["input_ids"][0].tolist() == words(no_bos, "a red") + [no_bos.tokenizer.eos_token_id]
    _, processor = bridged()
    plain = processor(target="a red <image> circle", image_ids=torch.zeros(1, *GRID, dtype=torch.long),
                      add_special_tokens=False, add_eos=False, padding=True, return_tensors="pt")["input_ids"][0].tolist()
    assert processor.tokenizer.bos_token_id not in plain and plain[:2] == words(processor, "a red")


def test_precomputed_image_ids_equal_raw_images(setup, images):
    _, processor = setup
    prompts, texts = ["<image> describe", "draw a red circle"], ["a red circle <image>", "<image>"]
    reference = processor(text=prompts, target=texts, images=images, padding=True, return_tensors="pt")
    ids = image_ids_of(processor, images)  # (3, 4, 4)
    for variant in (
        dict(image_ids=ids),
        dict(image_ids=list(ids)),
        dict(image_ids=[[ids[0], ids[1]], [ids[2]]]),
        dict(images=[[images[0], images[1]], [images[2]]]),
    ):
        out = processor(text=prompts, target=texts, **variant, padding=True, return_tensors="pt")
        assert all(torch.equal(out[k], reference[k]) for k in reference)


def test_clear_errors_for_bad_image_inputs(setup, images):
    _, processor = setup
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(target=["<image> a", "<image> b"], images=images[:1], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="sample 1 has 1 <image> placeholders but 2 images"):
        processor(target=["<image> a", "<image> b"], images=[[images[0]], [images[1], images[2]]], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="no images= or image_ids="):
        processor(target=["<image> a"], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="either images= or image_ids="):
        processor(target=["<image>"], images=images[:1], image_ids=image_ids_of(processor, images[:1]), padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="write images as <image> placeholders"):
        processor(target=["a <boi> red"], padding=True, return_tensors="pt")
    without_vt = UnifiedProcessor(processor.image_processor, processor.tokenizer, processor.image_vocab)
    with pytest.raises(ValueError, match="no visual tokenizer"):
        without_vt(target=["<image>"], images=images[:1], padding=True, return_tensors="pt")
    # image_ids alone need no visual tokenizer
    out = without_vt(target=["<image>"], image_ids=image_ids_of(processor, images[:1]), padding=True, return_tensors="pt")
    assert out["input_ids"].shape == (1, SPAN + 2)


# ---------------------------------------------------------------------------------------------- decoding
def test_encode_decode_round_trip(setup, images):
    _, processor = setup
    text = "a red circle <image> on the left <image> and"
    ids = processor(target=text, images=images[:2], padding=True, return_tensors="pt")["input_ids"][0]
    pieces = processor.decode(ids)
    assert [p for p in pieces if isinstance(p, str)] == ["a red circle", "on the left", "and"]
    assert [type(p) for p in pieces] == [str, Image.Image, str, Image.Image, str]
    image_ids = image_ids_of(processor, images[:2])
    expected = processor.image_processor.postprocess(processor.visual_tokenizer.decode(image_ids))
    for got, want in zip([pieces[1], pieces[3]], expected):
        assert got.size == (32, 32)
        assert np.array_equal(np.asarray(got), np.asarray(want))
    decoded_ids = processor.decode_image_ids(ids)
    assert len(decoded_ids) == 2 and all(torch.equal(a, b) for a, b in zip(decoded_ids, image_ids))
    batch = processor(target=[text, "a red"], images=images[:2], padding_side="left", padding=True, return_tensors="pt")["input_ids"]
    decoded = processor.batch_decode(batch)
    assert decoded[1] == ["a red"]
    assert [p for p in decoded[0] if isinstance(p, str)] == ["a red circle", "on the left", "and"]


def _broken(processor, images, how: str) -> list[int]:
    """A sequence ``a red <image> circle`` whose image span is damaged in one way."""
    ids = processor(target="a red <image> circle", images=images[:1], add_eos=False, padding=True, return_tensors="pt")["input_ids"][0].tolist()
    vocab, start = processor.image_vocab, ids.index(processor.image_vocab.boi_token_id)
    text_id = words(processor, "blue")[0]
    if how == "truncated":
        return ids[: start + 7]
    if how == "missing eoi":
        return ids[: start + SPAN - 1] + ids[start + SPAN :]
    if how == "short row":
        return ids[: start + 2] + ids[start + 3 :]
    if how == "missing eol":
        ids[start + GRID[1] + 1] = vocab.offset  # the first row's <eol> becomes an image token
        return ids
    if how == "text inside":
        ids[start + 3] = text_id
        return ids
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not closed by <eoi>"),
        ("missing eoi", "not closed by <eoi>"),
        ("short row", f"has {SPAN - 1} tokens, expected {SPAN}"),
        ("missing eol", "row 0 of the image span does not end with <eol>"),
        ("text inside", "not an image token"),
    ],
)
def test_malformed_spans_are_named(setup, images, how, message):
    _, processor = setup
    ids = _broken(processor, images, how)
    with pytest.raises(MalformedImageSpanError, match=message):
        processor.decode(ids)
    pieces = processor.decode(ids, lenient=True)
    assert pieces[0] == "a red"
    malformed = [p for p in pieces if isinstance(p, str) and p.startswith("[malformed image:")]
    assert len(malformed) == 1 and message in malformed[0]
    assert not any(isinstance(p, Image.Image) for p in pieces)
    if how != "truncated":
        assert pieces[-1] == "circle"  # the text after the broken span survives


def test_stray_image_tokens_outside_spans(setup):
    _, processor = setup
    vocab = processor.image_vocab
    ids = words(processor, "a red") + [vocab.eoi_token_id, vocab.offset + 3] + words(processor, "circle")
    with pytest.raises(MalformedImageSpanError, match="<eoi> at position 2 lies outside an image span"):
        processor.decode(ids)
    assert processor.decode(ids, lenient=True) == ["a red circle"]


# ---------------------------------------------------------------------------------------------- persistence
def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_save_load_round_trip(setup, images, tmp_path):
    _, processor = setup
    processor.padding_side = "left"
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.padding_side = "right"
    for name in ("tokenizer.json", "processor_config.json", "preprocessor_config.json", "image_vocab.json",
                 "visual_tokenizer/config.json", "visual_tokenizer/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UnifiedProcessor) and loaded.padding_side == "left"
    assert loaded.image_vocab == processor.image_vocab
    kwargs = dict(text=["<image> describe", "draw"], target=["a red circle", "<image>"], images=images[:2],
                  return_loss_masks=True, padding=True, return_tensors="pt")
    assert _same(loaded(**kwargs), processor(padding_side="left", **kwargs))
    ids = processor(target="a <image> red", images=images[:1], padding=True, return_tensors="pt")["input_ids"][0]
    ours, theirs = processor.decode(ids), loaded.decode(ids)
    assert ours[0] == theirs[0] and np.array_equal(np.asarray(ours[1]), np.asarray(theirs[1]))


def test_sentencepiece_tokenizer_round_trip(images, tmp_path):
    sentences = ["a red circle on the left", "draw a blue square", "describe the green circle"] * 10
    tokenizer = build_sentencepiece_tokenizer(sentences, vocab_size=60)
    visual_tokenizer = tiny_visual_tokenizer()
    vocab = bridge_llm(tiny_llm(len(tokenizer)), tokenizer, 32, grid_size=GRID,
                       tokenizer_fingerprint=visual_tokenizer.fingerprint())
    processor = UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab, visual_tokenizer)
    kwargs = dict(text="describe <image>", target="a red circle on the left <image>", images=images[:2], padding=True, return_tensors="pt")
    out = processor(**kwargs)
    assert out["input_ids"][0, 0] != tokenizer.bos_token_id  # this tokenizer adds no BOS, so neither do we
    pieces = processor.decode(out["input_ids"][0])
    assert [type(p) for p in pieces] == [str, Image.Image, str, Image.Image]
    assert pieces[0] == "describe" and pieces[2] == "a red circle on the left"
    processor.save_pretrained(tmp_path)
    assert _same(AutoProcessor.from_pretrained(tmp_path)(**kwargs), out)


def test_processor_refuses_mismatched_tokenizer(setup, tmp_path):
    _, processor = setup
    plain = build_word_tokenizer([WORDS])
    with pytest.raises(ValueError, match="mismatched vocabulary"):
        UnifiedProcessor(processor.image_processor, plain, processor.image_vocab)
    shifted = build_word_tokenizer([WORDS + " square2"])  # one more text word: every image id moves by one
    bridge_llm(tiny_llm(len(shifted)), shifted, 32, grid_size=GRID)
    with pytest.raises(ValueError, match=r"mismatched vocabulary.*'<boi>' is \d+ \(expected"):
        UnifiedProcessor(processor.image_processor, shifted, processor.image_vocab)
    processor.save_pretrained(tmp_path)
    shifted.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mismatched vocabulary"):
        UnifiedProcessor.from_pretrained(tmp_path)


def test_bundle_round_trip(setup, images, tmp_path):
    model, processor = setup
    target = tmp_path / "bundle"
    save_bundle(target, model, processor, base_model="tiny-llama")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "processor_config.json", "image_vocab.json", "preprocessor_config.json", "README.md",
                 "visual_tokenizer/config.json", "visual_tokenizer/model.safetensors"):
        assert (target / name).is_file(), name
    card = (target / "README.md").read_text()
    assert "tiny-llama" in card and "35 tokens = 32 image ids + 3 specials" in card and "grid 4x4" in card
    loaded_model, loaded = load_bundle(target)
    kwargs = dict(text=["<image> describe", "draw"], target=["a red circle", "<image>"], images=images[:2], padding=True, return_tensors="pt")
    batch = processor(**kwargs)
    assert _same(loaded(**kwargs), batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(loaded_model(**inputs).logits, model(**inputs).logits)
    assert isinstance(AutoProcessor.from_pretrained(target), UnifiedProcessor)


def test_bundle_overwrite_is_atomic(setup, tmp_path, monkeypatch):
    model, processor = setup
    target = tmp_path / "bundle"
    save_bundle(target, model, processor)
    save_bundle(target, model, processor)  # replacing a complete bundle works
    before = sorted(p.name for p in target.iterdir())

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(processor, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(target, model, processor)
    assert sorted(p.name for p in target.iterdir()) == before
    assert os.listdir(tmp_path) == ["bundle"]  # no staging or backup folders left behind
    load_bundle(target)


def test_bundle_refuses_a_different_visual_tokenizer(setup, tmp_path):
    model, processor = setup
    target = tmp_path / "bundle"
    save_bundle(target, model, processor)
    tiny_visual_tokenizer(seed=1).save_pretrained(target / "visual_tokenizer")
    with pytest.raises(ValueError, match="fingerprint"):
        load_bundle(target)


def test_bundle_refuses_a_model_without_image_rows(setup, tmp_path):
    _, processor = setup
    small = tiny_llm(processor.image_vocab.text_vocab_size)
    with pytest.raises(ValueError, match=f"only {processor.image_vocab.text_vocab_size} rows"):
        save_bundle(tmp_path / "bundle", small, processor)
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------------------------------------- decoding odd ids
def test_decoding_labels_skips_the_ignore_index(setup, images):
    _, processor = setup
    batch = processor(text=["draw: a red circle", "draw:"], target=["<image>", "a red <image>"], images=images[:2], padding=True, return_tensors="pt")
    labels = batch["labels"]
    assert (labels == -100).any()
    for lenient, repair in ((False, False), (True, False), (False, True)):
        decoded = processor.batch_decode(labels, lenient=lenient, repair=repair)
        assert [type(p) for p in decoded[0]] == [Image.Image]
        assert [type(p) for p in decoded[1]] == [str, Image.Image] and decoded[1][0] == "a red"
    assert processor.decode_image_ids(labels[0])[0].shape == GRID
    assert processor.decode(torch.full((5,), -100)) == []


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([5, -1, 6]), "token id -1 at position 1 is outside the vocabulary"),
    ([5, 2**63, 6], "is outside the vocabulary"),
    ([5, -(2**70)], "is outside the vocabulary"),
    (torch.tensor([1.0, 2.0]), "must be integers"),
    ([5, 2.0], "must be integers"),
    ([5, True], "must be integers"),
    (np.array([1.5]), "must be integers"),
    (torch.tensor([[1, 2], [3, 4]]), "batch_decode"),
    ("a red", "one sequence"),
])
def test_decode_gives_clear_errors_for_ids_that_are_no_token(setup, bad, message):
    _, processor = setup
    for options in ({}, {"lenient": True}, {"repair": True}):
        with pytest.raises(ValueError, match=message):
            processor.decode(bad, **options)
        with pytest.raises(ValueError, match=message):
            processor.decode_image_ids(bad, **options)


def test_text_ids_past_the_tokenizer_are_refused_not_dropped(setup):
    _, processor = setup
    past = len(processor.tokenizer)  # e.g. a row of an embedding padded to a multiple of 64
    ids = words(processor, "a red") + [past]
    with pytest.raises(ValueError, match=f"token id {past} at position 2 is outside the vocabulary"):
        processor.decode(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        processor.batch_decode([ids], lenient=True)
    assert processor.decode(ids[:-1]) == ["a red"]


def test_batch_decode_refuses_what_is_not_a_batch(setup):
    _, processor = setup
    with pytest.raises(ValueError, match="batch_decode takes a batch"):
        processor.batch_decode(torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="batch_decode takes a batch"):
        processor.batch_decode(7)
    with pytest.raises(ValueError, match="must be integers"):
        processor.batch_decode(torch.rand(2, 3))
    assert processor.batch_decode([]) == []


# ---------------------------------------------------------------------------------------------- what a processor refuses
def test_a_vocab_without_fingerprint_is_refused_unless_the_caller_opts_out(tmp_path):
    tokenizer = build_word_tokenizer([WORDS])
    visual_tokenizer = tiny_visual_tokenizer()
    vocab = bridge_llm(tiny_llm(len(tokenizer)), tokenizer, 32, grid_size=GRID)  # no fingerprint recorded
    assert vocab.tokenizer_fingerprint is None
    image_processor = VisualTokenizerImageProcessor(size=32)
    with pytest.raises(ValueError, match="records no visual-tokenizer fingerprint.*allow_missing_fingerprint"):
        UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer)
    processor = UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer,
                                 allow_missing_fingerprint=True)
    UnifiedProcessor(image_processor, tokenizer, vocab)  # without a visual tokenizer there is nothing to compare
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="refusing to load.*records no visual-tokenizer fingerprint"):
        UnifiedProcessor.from_pretrained(tmp_path)
    loaded = UnifiedProcessor.from_pretrained(tmp_path, allow_missing_fingerprint=True)
    assert loaded.visual_tokenizer is not None and loaded.image_vocab.tokenizer_fingerprint is None


def test_bridging_with_the_visual_tokenizer_records_its_fingerprint():
    visual_tokenizer = tiny_visual_tokenizer()
    tokenizer = build_word_tokenizer([WORDS])
    vocab = bridge_llm(tiny_llm(len(tokenizer)), tokenizer, 32, grid_size=GRID, visual_tokenizer=visual_tokenizer)
    assert vocab.tokenizer_fingerprint == visual_tokenizer.fingerprint()
    UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab, visual_tokenizer=visual_tokenizer)
    with pytest.raises(ValueError, match="not the fingerprint of the visual_tokenizer"):
        bridge_llm(tiny_llm(len(tokenizer)), build_word_tokenizer([WORDS]), 32, grid_size=GRID,
                   visual_tokenizer=visual_tokenizer, tokenizer_fingerprint="0" * 64)


def test_an_edited_grid_size_is_refused_against_the_visual_tokenizer(setup, tmp_path):
    _, processor = setup
    processor.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "image_vocab.json").read_text())
    (tmp_path / "image_vocab.json").write_text(json.dumps(dict(record, grid_size=[2, 8])))
    with pytest.raises(ValueError, match="grid_size \\[2, 8\\].*32x32 images into 4x4 ids"):
        UnifiedProcessor.from_pretrained(tmp_path)
    without_vt = UnifiedProcessor.from_pretrained(tmp_path, load_visual_tokenizer=False)  # ids only: nothing to check
    assert without_vt.image_vocab.grid_size == [2, 8]
    wrong_size = VisualTokenizerImageProcessor(size=64)
    with pytest.raises(ValueError, match="64x64 images into 8x8 ids"):
        UnifiedProcessor(wrong_size, processor.tokenizer, processor.image_vocab, processor.visual_tokenizer)
    any_size = VisualTokenizerImageProcessor(size=64, resize_mode="none", size_divisor=8)
    UnifiedProcessor(any_size, processor.tokenizer, processor.image_vocab, processor.visual_tokenizer)
