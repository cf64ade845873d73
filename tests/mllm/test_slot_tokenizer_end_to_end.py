"""The slot tokenizer through the bridge: token budgets in ImageVocab spans (``<boi> <n_b> ...``), budget-aware
generation, the processor and bundle with a SlotTokenizer, pre-tokenization with slot ids, and the llm stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from mllm.bundle.bundle import load_bundle, save_bundle
from mllm.cli import main as vtok
from mllm.data import pretokenize as pt
from mllm.generation.guidance import guided_generate_image_ids
from mllm.generation.logits import (
    EOI,
    IMAGE,
    SIZE,
    TEXT,
    ImageSpanLogitsProcessor,
    find_image_spans,
    generate_images,
)
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import (
    ImageVocab,
    MalformedImageSpanError,
    SlotTokenizer,
    SlotTokenizerConfig,
)
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.interface import (
    image_ids_shape,
    image_vocab_layout,
    load_visual_tokenizer,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

WORDS = "a red green blue circle square draw describe caption on the left right"
BUDGETS = [4, 8]
LEVELS, K = 2, 16


def budget_vocab(level_order="position", separate=True, budgets=(2, 4)) -> ImageVocab:
    return ImageVocab(offset=20, codebook_size=8, boi_token_id=10, eoi_token_id=11, layout="sequence",
                      budgets=list(budgets), budget_token_offset=12, num_levels=2, level_order=level_order,
                      separate_level_ranges=separate, text_vocab_size=10)


def tiny_slot_tokenizer(seed: int = 0, **overrides) -> SlotTokenizer:
    torch.manual_seed(seed)
    options = dict(base_channels=8, backbone_dim=16, latent_dim=16, num_slots=8, slot_budgets=BUDGETS, slot_iters=1,
                   num_heads=2, codebook_size=K, residual_levels=LEVELS, decoder="broadcast", image_size=32,
                   quantizer_warmup_steps=0)
    return SlotTokenizer(SlotTokenizerConfig(**{**options, **overrides})).eval()


def tiny_llm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def bridged(visual_tokenizer=None):
    visual_tokenizer = visual_tokenizer or tiny_slot_tokenizer()
    tokenizer = build_word_tokenizer([WORDS])
    model = tiny_llm(len(tokenizer))
    vocab = bridge_llm(model, tokenizer, tokenizer_fingerprint=visual_tokenizer.fingerprint(),
                       **image_vocab_layout(visual_tokenizer, 32))
    processor = UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab,
                                 visual_tokenizer=visual_tokenizer)
    return model, processor


@pytest.fixture(scope="module")
def setup():
    return bridged()


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


class Prefer(LogitsProcessor):
    """Raises one token's logit, as a model that prefers it would."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_id] += 100.0
        return scores


# ---------------------------------------------------------------------------------------------------- ImageVocab
@pytest.mark.parametrize("level_order,separate", [("position", True), ("level", True), ("position", False)])
def test_budget_spans_state_their_budget_and_round_trip(level_order, separate):
    vocab = budget_vocab(level_order, separate)
    assert vocab.num_tokens == 4 and vocab.head_length == 1 and vocab.budget_token_ids == [12, 13]
    assert vocab.budget_token_strings() == ["<n2>", "<n4>"] and vocab.span_length == 2 + 1 + 4 * 2
    gen = torch.Generator().manual_seed(0)
    for budget in (2, 4):
        ids = torch.randint(0, 8, (budget, 2), generator=gen)
        span = vocab.build_span(ids)
        assert span.shape == (vocab.span_length_of(1, budget),)
        assert span.tolist()[:2] == [10, vocab.budget_token(budget)]
        assert span[-1] == 11
        parsed, got_budget = vocab.parse_span(span, return_budget=True)
        assert torch.equal(parsed, ids) and got_budget == budget
        assert torch.equal(vocab.parse_span(span), ids)
        batch = torch.randint(0, 8, (3, budget, 2), generator=gen)
        assert torch.equal(vocab.build_spans(batch)[1], vocab.build_span(batch[1]))
    assert vocab.budget_of_tokens(torch.tensor([12, 13, 14, 5])).tolist() == [2, 4, 0, 0]


def test_level_major_budget_span_layout():
    vocab = budget_vocab("level", True)
    ids = torch.tensor([[1, 2], [3, 4]])  # 2 positions x 2 levels
    span = vocab.build_span(ids).tolist()
    # <boi> <n2> [level 0: 1, 3] [level 1: 2, 4] <eoi>; level 1 ids live in their own range (offset + 8)
    assert span == [10, 12, 20 + 1, 20 + 3, 28 + 2, 28 + 4, 11]


def test_strict_parsing_checks_the_length_against_the_budget():
    vocab = budget_vocab()
    span = vocab.build_span(torch.zeros(2, 2, dtype=torch.long))
    too_long = torch.cat([span[:1], torch.tensor([vocab.budget_token(4)]), span[2:]])  # says 4, holds 2 positions
    with pytest.raises(MalformedImageSpanError, match=r"expected 11 .*budget token <n4>, 4 positions"):
        vocab.parse_span(too_long)
    with pytest.raises(MalformedImageSpanError, match="budget token"):
        vocab.parse_span(torch.cat([span[:1], span[2:]]))  # no budget token
    with pytest.raises(ValueError, match="token budgets"):
        vocab.build_span(torch.zeros(3, 2, dtype=torch.long))  # 3 is not a budget
    with pytest.raises(ValueError, match="not one of"):
        vocab.budget_token(3)


def test_repair_keeps_the_stated_budget_or_infers_a_missing_one():
    vocab = budget_vocab()
    ids = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0]])
    span = vocab.build_span(ids)
    cut = span[:-3]  # lost the last position (both levels) and <eoi>: budget 4, 3 positions
    parsed = vocab.repair_span(cut)
    assert parsed.budget == 4 and parsed.image_ids.shape == (4, 2)
    assert torch.equal(parsed.image_ids[:3], ids[:3])
    assert any("missing <eoi>" in r for r in parsed.repairs) and any("missing image token" in r for r in parsed.repairs)
    no_budget = torch.cat([span[:1], vocab.build_span(ids[:2])[2:]])  # <boi> + 2 positions + <eoi>, no <n_b>
    parsed = vocab.repair_span(no_budget)
    assert parsed.budget == 2 and torch.equal(parsed.image_ids, ids[:2])
    assert parsed.repairs == ["inferred the missing budget token <n2> from 4 image tokens"]
    assert vocab.parse_span(no_budget, lenient=True, return_budget=True)[1] == 2
    assert vocab.repair_span(span).budget == 4 and vocab.repair_span(span).repairs == []


def test_budget_validation_and_json_round_trip(tmp_path):
    with pytest.raises(ValueError, match="sequence layout only"):
        ImageVocab(offset=20, codebook_size=8, boi_token_id=10, eoi_token_id=11, eol_token_id=19, layout="grid",
                   grid_size=(2, 2), budgets=[2], budget_token_offset=12)
    with pytest.raises(ValueError, match="largest budget"):
        ImageVocab(offset=20, codebook_size=8, boi_token_id=10, eoi_token_id=11, layout="sequence", num_tokens=8,
                   budgets=[2, 4], budget_token_offset=12)
    with pytest.raises(ValueError, match="budget_token_offset"):
        ImageVocab(offset=20, codebook_size=8, boi_token_id=10, eoi_token_id=11, layout="sequence", budgets=[2, 4])
    with pytest.raises(ValueError, match="overlap"):
        ImageVocab(offset=20, codebook_size=8, boi_token_id=10, eoi_token_id=11, layout="sequence", budgets=[2, 4],
                   budget_token_offset=19)
    vocab = budget_vocab()
    vocab.save_pretrained(tmp_path)
    loaded = ImageVocab.from_pretrained(tmp_path)
    assert loaded.budgets == [2, 4] and loaded.budget_token_offset == 12 and loaded.to_dict() == vocab.to_dict()
    assert vocab.max_token_id == 20 + 16 - 1


def test_bridge_adds_one_budget_token_per_budget():
    tokenizer = build_word_tokenizer([WORDS])
    n_text = len(tokenizer)
    model = tiny_llm(n_text)
    vocab = bridge_llm(model, tokenizer, 16, layout="sequence", budgets=[8, 4], num_levels=2,
                       separate_level_ranges=True)
    assert vocab.budgets == [4, 8] and vocab.num_tokens == 8
    assert vocab.budget_token_ids == [n_text + 2, n_text + 3] and vocab.offset == n_text + 4
    assert tokenizer.convert_tokens_to_ids(["<n4>", "<n8>"]) == vocab.budget_token_ids
    assert len(tokenizer) == n_text + 2 + 2 + 2 * 16
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    span = vocab.build_span(torch.zeros(4, 2, dtype=torch.long))
    assert tokenizer.convert_ids_to_tokens(span[:3].tolist()) == ["<boi>", "<n4>", "<img_L0_0>"]


# ---------------------------------------------------------------------------------------------------- generation
def test_logits_processor_lets_the_model_choose_a_budget_then_enforces_its_length():
    vocab = budget_vocab()
    span = ImageSpanLogitsProcessor(vocab, 40)
    prefix = [1, 2, vocab.boi_token_id]
    rows = {"opened": prefix, "budget2": prefix + [12] + [20, 28] * 2, "budget4_half": prefix + [13] + [20, 28] * 2,
            "budget4_mid_position": prefix + [13, 20], "closed": prefix + [12, 20, 28, 20, 28, 11]}
    width = max(len(r) for r in rows.values())
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows.values()])
    assert span.next_categories(ids).tolist() == [SIZE, EOI, IMAGE, IMAGE, TEXT]
    scores = span(ids, torch.zeros(len(rows), 40))
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in scores]
    assert allowed[0] == {12, 13} and allowed[1] == {11}
    assert allowed[2] == set(range(20, 28)) and allowed[3] == set(range(28, 36))  # level 0, then level 1 range
    assert not allowed[4] & {11, 12, 13} and 10 in allowed[4]  # text: no budget / image tokens, <boi> allowed
    forced = ImageSpanLogitsProcessor(vocab, 40, budget=2)
    assert set(torch.isfinite(forced(ids[:1], torch.zeros(1, 40))).nonzero()[:, 1].tolist()) == {12}
    with pytest.raises(ValueError, match="token budgets"):
        ImageSpanLogitsProcessor(vocab, 40, budget=3)
    forced.reset()
    with pytest.raises(ValueError, match="breaks the span grammar"):
        forced(torch.tensor([prefix + [13]]), torch.zeros(1, 40))  # the prompt opened a budget the caller forbids


def test_generation_picks_any_budget_or_the_forced_one(setup):
    model, processor = setup
    vocab, tokenizer = processor.image_vocab, processor.tokenizer
    torch.manual_seed(0)
    chosen = generate_images(model, tokenizer, vocab, ["draw a red circle", "draw"], do_sample=True,
                             num_return_sequences=3)
    assert isinstance(chosen, list) and len(chosen) == 6
    assert all(ids.shape[0] in BUDGETS and ids.shape[1:] == (LEVELS,) for ids in chosen)
    forced = generate_images(model, tokenizer, vocab, ["draw a red circle", "draw"], budget=4)
    assert forced.shape == (2, 4, LEVELS) and int(forced.max()) < K
    for budget in BUDGETS:  # the budget is the model's choice: a model that prefers <n_b> gets b slots
        prefer = Prefer(vocab.budget_token(budget))
        picked = generate_images(model, tokenizer, vocab, ["draw a red circle"], logits_processor=[prefer])
        assert [ids.shape for ids in picked] == [(budget, LEVELS)]
    # the model's own choice, through plain model.generate: every closed span parses with the budget it states
    prompt = torch.tensor([[tokenizer.bos_token_id, vocab.boi_token_id]])
    span = ImageSpanLogitsProcessor(vocab, model.get_output_embeddings().weight.shape[0])
    out = model.generate(prompt, logits_processor=LogitsProcessorList([span]), do_sample=True,
                         max_new_tokens=vocab.span_length - 1, num_return_sequences=4,
                         pad_token_id=tokenizer.pad_token_id)
    for row in out:
        start, end = find_image_spans(row, vocab)[0]
        ids, budget = vocab.parse_span(row[start:end], return_budget=True)
        assert budget in BUDGETS and ids.shape == (budget, LEVELS)
    guided = guided_generate_image_ids(model, processor, ["a red circle", None], guidance_scale=2.0, do_sample=True)
    assert len(guided) == 2 and all(ids.shape[0] in BUDGETS and ids.shape[1:] == (LEVELS,) for ids in guided)


# ---------------------------------------------------------------------------------------------------- processor
def test_processor_encodes_with_a_budget_and_decodes_each_span_with_its_own(setup, pictures):
    _, processor = setup
    vocab, vt = processor.image_vocab, processor.visual_tokenizer
    assert vocab.layout == "sequence" and vocab.budgets == BUDGETS and vocab.num_levels == LEVELS
    full = processor(text=["<image> caption"], target=["a red circle"], images=pictures[:1], padding=True, return_tensors="pt")
    small = processor(text=["<image> caption"], target=["a red circle"], images=pictures[:1], budget=4, padding=True, return_tensors="pt")
    ids = full["input_ids"][0].tolist()
    boi = ids.index(vocab.boi_token_id)
    assert ids[boi + 1] == vocab.budget_token(8) and ids[boi + 2 + 8 * LEVELS] == vocab.eoi_token_id
    assert small["input_ids"].shape[1] == full["input_ids"].shape[1] - 4 * LEVELS
    pixels = torch.as_tensor(processor.image_processor.preprocess(pictures[:1])["pixel_values"])
    for batch, budget in ((full, 8), (small, 4)):
        (got,) = processor.decode_image_ids(batch["input_ids"][0])
        assert torch.equal(got, vt.encode(pixels, num_slots=budget)[0])
        decoded = processor.decode(batch["input_ids"][0])
        assert isinstance(decoded[0], Image.Image) and decoded[0].size == (32, 32)
        expected = processor.image_processor.postprocess(vt.decode(got[None]).float())[0]
        assert np.array_equal(np.asarray(decoded[0]), np.asarray(expected))
    both = processor(target=["<image> on <image>"], image_ids=[vt.encode(pixels, num_slots=4)[0],
                                                                vt.encode(pixels, num_slots=8)[0]], padding=True, return_tensors="pt")
    images = [p for p in processor.decode(both["input_ids"][0]) if isinstance(p, Image.Image)]
    assert len(images) == 2  # two budgets in one sequence, decoded per budget group
    with pytest.raises(ValueError, match="token budgets"):
        processor(target=["<image>"], images=pictures[:1], budget=5, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="budget= applies to raw images"):
        processor(target=["<image>"], image_ids=[got], budget=4, padding=True, return_tensors="pt")


def test_processor_refuses_a_mismatched_slot_tokenizer(setup):
    _, processor = setup
    other = tiny_slot_tokenizer(seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        UnifiedProcessor(processor.image_processor, processor.tokenizer, processor.image_vocab, visual_tokenizer=other)
    tokenizer = build_word_tokenizer([WORDS])
    grid = bridge_llm(tiny_llm(len(tokenizer)), tokenizer, K, grid_size=(2, 4), num_levels=LEVELS,
                      separate_level_ranges=True)
    with pytest.raises(ValueError, match="sequence of slots"):
        UnifiedProcessor(processor.image_processor, tokenizer, grid, visual_tokenizer=other)


def test_bundle_round_trip_with_a_slot_tokenizer(setup, pictures, tmp_path):
    model, processor = setup
    save_bundle(tmp_path, model, processor, base_model="org/tiny")
    card = (tmp_path / "README.md").read_text()
    assert "token budgets 4, 8" in card and "`SlotTokenizer`" in card
    assert json.loads((tmp_path / "visual_tokenizer" / "config.json").read_text())["model_type"] == "slot_tokenizer"
    loaded_model, loaded = load_bundle(tmp_path)
    assert isinstance(loaded.visual_tokenizer, SlotTokenizer) and loaded.image_vocab.budgets == BUDGETS
    batch = processor(text=["<image> caption"] * 2, target=["a red circle"] * 2, images=pictures, budget=4, padding=True, return_tensors="pt")
    again = loaded(text=["<image> caption"] * 2, target=["a red circle"] * 2, images=pictures, budget=4, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], again["input_ids"])
    assert loaded.visual_tokenizer.fingerprint() == processor.visual_tokenizer.fingerprint()
    for vt in (AutoModel.from_pretrained(tmp_path, subfolder="visual_tokenizer"),
               load_visual_tokenizer(tmp_path / "visual_tokenizer")):
        assert isinstance(vt, SlotTokenizer) and vt.fingerprint() == processor.visual_tokenizer.fingerprint()
    # the exported remote code (what trust_remote_code=True loads where tokenizer-bridge is not installed)
    auto_map = json.loads((tmp_path / "visual_tokenizer" / "config.json").read_text())["auto_map"]
    remote_class = get_class_from_dynamic_module(auto_map["AutoModel"], str(tmp_path / "visual_tokenizer"))
    assert remote_class.__module__.startswith("transformers_modules.") and remote_class.__name__ == "SlotTokenizer"
    remote = remote_class.from_pretrained(tmp_path / "visual_tokenizer").eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(remote.encode(pixels, num_slots=4), processor.visual_tokenizer.encode(pixels, num_slots=4))


def test_layout_helpers_for_grid_and_slot_tokenizers():
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    slot = tiny_slot_tokenizer()
    assert image_vocab_layout(slot, 32) == dict(codebook_size=K, num_levels=LEVELS, layout="sequence",
                                                budgets=BUDGETS)
    assert image_ids_shape(slot, 32) == (8, LEVELS)
    single = tiny_slot_tokenizer(slot_budgets=[4], residual_levels=1)
    assert image_vocab_layout(single, 32) == dict(codebook_size=K, num_levels=1, layout="sequence", num_tokens=4)
    assert single.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4)  # the full trained budget, not num_slots=8
    grid = VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                                 image_size=32))
    assert image_vocab_layout(grid, 64) == dict(codebook_size=16, num_levels=1, layout="grid", grid_size=(8, 8))
    assert image_ids_shape(grid, 32) == (4, 4)


# ---------------------------------------------------------------------------------------------------- pretokenize
def test_pretokenize_stores_slot_ids_and_checks_the_fingerprint(tmp_path, pictures):
    vt_path = tmp_path / "vt"
    tiny_slot_tokenizer().save_pretrained(vt_path)
    (tmp_path / "img").mkdir()
    lines = []
    for k, picture in enumerate(pictures * 2):
        picture.save(tmp_path / "img" / f"{k}.png")
        lines.append(json.dumps({"image": f"img/{k}.png", "caption": f"picture {k}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    source = str(tmp_path / "captions.jsonl")
    report = pt.pretokenize(source, str(tmp_path / "out"), pt.PretokenizeSettings(visual_tokenizer=str(vt_path)))
    vt = load_visual_tokenizer(vt_path)
    dataset = pt.load_pretokenized(str(tmp_path / "out"), vt.fingerprint())
    assert report.kept == 4 and len(dataset) == 4
    ids = torch.as_tensor(np.array(dataset.with_format("numpy")["image_ids"]))
    assert ids.shape == (4, 8, LEVELS)
    pixels = torch.as_tensor(VisualTokenizerImageProcessor(size=32, size_divisor=4).preprocess(pictures * 2)
                             ["pixel_values"])
    assert torch.equal(ids.long(), vt.encode(pixels))
    with pytest.raises(pt.FingerprintMismatchError):
        pt.load_pretokenized(str(tmp_path / "out"), tiny_slot_tokenizer(seed=1).fingerprint())
    vtok(["pretokenize", "--source", source, "--visual-tokenizer", str(vt_path), "--out", str(tmp_path / "small"),
          "--budget", "4"])
    small = pt.load_pretokenized(str(tmp_path / "small"), vt.fingerprint())
    assert np.array(small[0]["image_ids"]).shape == (4, LEVELS)
    assert pt.read_manifest(str(tmp_path / "small"))["budget"] == 4
    with pytest.raises(ValueError, match="trained budgets"):
        pt.pretokenize(source, str(tmp_path / "bad"), pt.PretokenizeSettings(visual_tokenizer=str(vt_path), budget=5))


# ---------------------------------------------------------------------------------------------------- llm stage
def test_llm_stage_trains_on_slot_ids_and_generates_a_decodable_span(tmp_path):
    from mllm.data.tasks import t2i_prompt
    from mllm.generation.inference import text_to_image
    from mllm.training.loop import run
    from mllm.training.recipe import load_recipe

    tiny_slot_tokenizer().save_pretrained(tmp_path / "vt")
    recipe = load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tmp_path / 'vt'}", "data.num_train=16",
        "train.steps=4", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.save_every=0",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    ])
    path, history = run(recipe)
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
    model, processor = load_bundle(path)
    vocab = processor.image_vocab
    assert isinstance(processor.visual_tokenizer, SlotTokenizer)
    assert vocab.layout == "sequence" and vocab.budgets == BUDGETS and vocab.num_levels == LEVELS
    torch.manual_seed(0)
    for budget in (None, 4):
        generated = generate_images(model, processor.tokenizer, vocab, [t2i_prompt("a red circle")], budget=budget,
                                    do_sample=True)
        ids = generated[0]
        assert ids.shape[0] in BUDGETS and ids.shape[1:] == (LEVELS,) and (budget is None or ids.shape[0] == budget)
        (picture,) = processor.image_ids_to_images([ids])
        assert isinstance(picture, Image.Image) and picture.size == (32, 32)
    pictures = text_to_image(model, processor, ["a red circle", None], do_sample=True)  # the bundle's user path
    assert len(pictures) == 2 and all(p.size == (32, 32) for p in pictures)
