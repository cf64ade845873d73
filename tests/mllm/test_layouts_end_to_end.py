"""Every image-vocabulary layout through the user-facing pieces: inference, LLM-level evaluation, LoRA rows, model card
and the llm training stage (levels picked for residual tokenizers, layouts picked by the recipe).

Layouts: fixed and variable-size grids, sequences, residual levels (position- or level-major, shared or separate id
ranges), factorized sub-tokens (even and uneven radices) and unified codebooks (image ids are existing text tokens).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mllm.bundle.bundle import load_bundle
from mllm.bundle.model_card import growth_summary, layout_summary, model_card
from mllm.data.tasks import PLACEHOLDER, t2i_prompt
from mllm.eval.llm import (
    evaluate_bundle,
    evaluation_image_size,
    image_token_classes,
    image_token_perplexity,
)
from mllm.generation.inference import (
    DEFAULT_IMAGE_SIZE_KEY,
    caption_image_ids,
    default_image_size,
    generate_image_ids,
)
from mllm.lora import new_token_ids, wrap_lora
from mllm.model import bridge
from mllm.text_tokenizers import build_word_tokenizer
from mllm.training.loop import run
from mllm.training.recipe import (
    ImageVocabRecipe,
    LoraRecipe,
    image_vocab_recipe,
    load_recipe,
    recipe_from_dict,
)
from tokenizer_bridge import ImageLayout, VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import add_image_tokens, bridge_llm

hf_logging.set_verbosity_error()

WORDS = "a red green blue circle square draw caption : on the left right top bottom big small"
UNICODE_IDS = [4, 5, 6, 7, 8, 9, 10, 11]  # existing word tokens reused as the 8 image ids
LAYOUTS = {
    "grid": dict(codebook_size=16, grid_size=(2, 3)),
    "variable": dict(codebook_size=16, grid_size=(3, 4), variable_size=True),
    "sequence": dict(codebook_size=16, layout="sequence", num_tokens=5),
    "levels_position_shared": dict(codebook_size=8, grid_size=(2, 3), num_levels=2),
    "levels_level_separate": dict(codebook_size=8, grid_size=(2, 3), num_levels=3, level_order="level",
                                  separate_level_ranges=True),
    "factorized": dict(codebook_size=64, grid_size=(2, 3), factors=[8, 8]),
    "factorized_uneven_levels": dict(codebook_size=48, layout="sequence", num_tokens=3, factors=[4, 12],
                                     num_levels=2, separate_level_ranges=True),
    "unicode": dict(codebook_size=8, grid_size=(2, 3), token_ids=UNICODE_IDS),
    "unicode_variable_levels": dict(codebook_size=8, grid_size=(3, 3), token_ids=UNICODE_IDS, variable_size=True,
                                    num_levels=2),
}
TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)


def bridged(name: str, seed: int = 0) -> tuple[LlamaForCausalLM, UnifiedProcessor]:
    tokenizer = build_word_tokenizer([WORDS])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **TINY_LLM)).eval()
    vocab = bridge_llm(model, tokenizer, **LAYOUTS[name])
    return model, UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab)


def image_shape(vocab, h=None, w=None) -> tuple:
    if vocab.layout == "sequence":
        positions = (vocab.num_tokens,)
    else:
        positions = (h or vocab.grid_size[0], w or vocab.grid_size[1])
    return positions + ((vocab.num_levels,) if vocab.num_levels > 1 else ())


def random_ids(vocab, n: int, h=None, w=None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab.codebook_size, (n, *image_shape(vocab, h, w)), generator=generator)


# ---------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_generate_and_caption_every_layout(name):
    model, processor = bridged(name)
    vocab = processor.image_vocab
    ids = generate_image_ids(model, processor, ["a red circle", None])
    expected = image_shape(vocab, *(default_image_size(vocab) if vocab.variable_size else (None, None)))
    assert ids.shape == (2, *expected) and 0 <= int(ids.min()) and int(ids.max()) < vocab.codebook_size
    torch.manual_seed(0)
    sampled = generate_image_ids(model, processor, ["a blue square"], do_sample=True, num_return_sequences=3,
                                 image_temperature=1.5)
    assert sampled.shape == (3, *expected)
    captions = caption_image_ids(model, processor, ids, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("name", ["variable", "unicode_variable_levels"])
def test_variable_grids_generate_a_size_per_prompt(name):
    model, processor = bridged(name)
    vocab = processor.image_vocab
    sizes = [(1, 2), (3, 3), (2, 1)]
    images = generate_image_ids(model, processor, ["a red circle", "big", None], image_size=sizes)
    assert [tuple(i.shape) for i in images] == [image_shape(vocab, h, w) for h, w in sizes]
    torch.manual_seed(0)
    repeated = generate_image_ids(model, processor, ["red", "blue"], image_size=[(1, 1), (2, 3)], do_sample=True,
                                  num_return_sequences=2)
    assert [tuple(i.shape)[:2] for i in repeated] == [(1, 1), (1, 1), (2, 3), (2, 3)]
    assert generate_image_ids(model, processor, ["red"], image_size=(2, 2)).shape == (1, *image_shape(vocab, 2, 2))
    captions = caption_image_ids(model, processor, images, max_new_tokens=3)  # a list of differently sized images
    assert len(captions) == 3
    vocab.extra[DEFAULT_IMAGE_SIZE_KEY] = [1, 3]  # the llm stage records the size it trained at
    assert default_image_size(vocab) == (1, 3)
    assert generate_image_ids(model, processor, ["red"]).shape == (1, *image_shape(vocab, 1, 3))
    with pytest.raises(ValueError, match="exceeds the largest grid"):
        generate_image_ids(model, processor, ["red"], image_size=(4, 1))
    with pytest.raises(ValueError, match="one .h, w. per prompt"):
        generate_image_ids(model, processor, ["red", "blue"], image_size=[(1, 1)])


def test_fixed_layouts_refuse_other_sizes():
    model, processor = bridged("grid")
    assert generate_image_ids(model, processor, ["red"], image_size=(2, 3)).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="2x3 grids; image_size=.* needs a variable-size grid"):
        generate_image_ids(model, processor, ["red"], image_size=(3, 3))
    with pytest.raises(ValueError, match="only variable-size grids choose an image size"):
        default_image_size(processor.image_vocab)
    model, processor = bridged("sequence")
    with pytest.raises(ValueError, match="sequences of 5 ids"):
        generate_image_ids(model, processor, ["red"], image_size=(1, 5))


# ---------------------------------------------------------------------------------------------------- evaluation
def allowed_ranges(vocab) -> list[set]:
    """Each image class's token ids, written out by hand from the layout's options."""
    if vocab.token_ids is not None:
        return [set(vocab.token_ids)]
    radices = vocab.factors or [vocab.codebook_size]
    blocks = vocab.num_levels if vocab.separate_level_ranges else 1
    out = []
    for block in range(blocks):
        for j, radix in enumerate(radices):
            start = vocab.offset + block * sum(radices) + sum(radices[:j])
            out.append(set(range(start, start + radix)))
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_image_token_perplexity_every_layout(name):
    model, processor = bridged(name, seed=1)
    vocab = processor.image_vocab
    captions = ["a red circle", "blue", "a big green square"]
    if vocab.variable_size:
        image_ids = [random_ids(vocab, 1, h, w, seed=i)[0] for i, (h, w) in enumerate([(1, 2), (3, 3), (2, 1)])]
    else:
        image_ids = random_ids(vocab, 3)
    result = image_token_perplexity(model, processor, captions, image_ids, batch_size=2)
    positions = sum(int(torch.as_tensor(i.shape[: 1 if vocab.layout == "sequence" else 2]).prod()) for i in image_ids)
    assert result["num_image_tokens"] == positions * vocab.tokens_per_position

    # the same numbers written out: every image token scored over its own id range (the set containing it)
    ranges = allowed_ranges(vocab)
    nll_full = nll_image = log_uniform = 0.0
    for caption, ids in zip(captions, image_ids):
        batch = processor(text=[t2i_prompt(caption)], target=[PLACEHOLDER], image_ids=[[ids]], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        targets = batch["input_ids"][0, 1:].tolist()
        is_target = (batch["labels"][0, 1:] != -100).tolist()  # the <image> span (+ EOS): no prompt text
        for t, (target, inside) in enumerate(zip(targets, is_target)):
            found = [r for r in ranges if target in r]
            if not inside or not found:
                continue
            allowed = sorted(found[0])
            nll_full -= float(F.log_softmax(logits[t], -1)[target])
            nll_image -= float(F.log_softmax(logits[t, allowed], -1)[allowed.index(target)])
            log_uniform += math.log(len(allowed))
    count = result["num_image_tokens"]
    assert result["image_token_perplexity"] == pytest.approx(math.exp(nll_full / count), rel=1e-4)
    assert result["image_token_perplexity_within_image_ids"] == pytest.approx(math.exp(nll_image / count), rel=1e-4)
    assert result["uniform_perplexity"] == pytest.approx(math.exp(log_uniform / count), rel=1e-9)
    assert 1 <= result["image_token_perplexity_within_image_ids"] <= result["image_token_perplexity"]
    assert 0 <= result["image_token_accuracy"] <= 1


def test_uniform_perplexity_of_uneven_factors_and_image_classes():
    model, processor = bridged("factorized_uneven_levels")
    vocab = processor.image_vocab
    result = image_token_perplexity(model, processor, ["red"], random_ids(vocab, 1))
    assert result["uniform_perplexity"] == pytest.approx(math.sqrt(4 * 12))  # sub-tokens of 4 and 12 values
    span = vocab.build_span(random_ids(vocab, 1)[0])
    row = torch.cat([torch.tensor([1, 5]), span, torch.tensor([6])])[None]
    classes = image_token_classes(vocab, row, vocab.max_token_id + 1)[0].tolist()
    # <boi>, then 3 positions x (level 0: sub-tokens 0, 1; level 1: sub-tokens 0, 1), <eoi>; text around is -1
    assert classes == [-1, -1, -1] + [0, 1, 2, 3] * 3 + [-1, -1]
    model, processor = bridged("grid")
    assert image_token_perplexity(model, processor, ["red"], random_ids(processor.image_vocab, 1))[
        "uniform_perplexity"] == 16


# ---------------------------------------------------------------------------------------------------- LoRA rows
@pytest.mark.parametrize("name", ["grid", "variable", "levels_level_separate", "factorized"])
def test_new_token_ids_are_every_added_token(name):
    tokenizer = build_word_tokenizer([WORDS])
    text_size = len(tokenizer)
    vocab = add_image_tokens(tokenizer, **LAYOUTS[name])
    assert new_token_ids(vocab) == list(range(text_size, len(tokenizer)))  # specials, size tokens, image tokens


def test_unified_codebook_lora_trains_the_span_tokens_only():
    model, processor = bridged("unicode")
    vocab = processor.image_vocab
    assert new_token_ids(vocab) == vocab.special_token_ids and not set(new_token_ids(vocab)) & set(UNICODE_IDS)
    tokenizer = build_word_tokenizer([WORDS])
    reused = add_image_tokens(tokenizer, 8, grid_size=(2, 3), token_ids=UNICODE_IDS,
                              special_tokens=["big", "small", "on"])
    assert new_token_ids(reused) == sorted(tokenizer.convert_tokens_to_ids(["big", "small", "on"]))

    peft = wrap_lora(model, LoraRecipe(enabled=True, r=2, alpha=4), vocab)
    embed = peft.get_input_embeddings()
    before = embed.token_adapter.get_merged_weights(["default"]).detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=0.05)
    batch = processor(text=["draw: a red circle"], target=[PLACEHOLDER], image_ids=random_ids(vocab, 1), padding=True, return_tensors="pt")
    for _ in range(2):
        peft(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = embed.token_adapter.get_merged_weights(["default"]).detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(vocab.special_token_ids)  # image ids are text rows: frozen


# ---------------------------------------------------------------------------------------------------- model card
def test_model_card_describes_every_layout():
    expected = {
        "grid": ("grid 2x3 (one <eol> per row)", "19 tokens = 16 image ids + 3 specials (<boi>, <eoi>, <eol>)"),
        "variable": ("variable-size grid up to 3x4", "26 tokens = 16 image ids + 7 size tokens + 3 specials"),
        "sequence": ("sequence of 5 ids", "18 tokens = 16 image ids + 2 specials (<boi>, <eoi>)"),
        "levels_position_shared": ("2 residual levels per position (position-major: all levels of a position, then "
                                   "the next, one id range shared by every level)", "11 tokens = 8 image ids + 3"),
        "levels_level_separate": ("3 residual levels per position (level-major: one full pass per level, a separate "
                                  "id range per level)",
                                  "27 tokens = 24 image tokens (3 level ranges for 8 image ids per level) + 3"),
        "factorized": ("each image id split into 2 sub-tokens (radices 8 x 8)",
                       "19 tokens = 16 image tokens (2 sub-token ranges for 64 image ids) + 3 specials"),
        "factorized_uneven_levels": ("radices 4 x 12", "34 tokens = 32 image tokens (4 level x sub-token ranges for "
                                     "48 image ids per level) + 2 specials"),
        "unicode": ("unified codebook: the 8 image ids are existing text tokens",
                    "3 tokens = 3 specials (<boi>, <eoi>, <eol>); the 8 image ids reuse existing text tokens"),
    }
    for name, (layout, growth) in expected.items():
        model, processor = bridged(name)
        card = model_card(model, processor, base_model="org/tiny")
        assert layout in card and growth in card, (name, layout_summary(processor.image_vocab),
                                                   growth_summary(processor.image_vocab))
    tokenizer = build_word_tokenizer([WORDS])
    reused = add_image_tokens(tokenizer, 8, grid_size=(2, 3), token_ids=UNICODE_IDS,
                              special_tokens=["big", "small", "on"])
    assert growth_summary(reused) == ("none: the vocabulary did not grow; the 8 image ids reuse existing text tokens "
                                      "(unified codebook), and so do the span markers")
    model, processor = bridged("variable")
    assert "; up to 19 tokens per image including <boi>/<eoi> (at 3x4)" in model_card(model, processor)


# ---------------------------------------------------------------------------------------------------- llm stage
def test_image_vocab_recipe_keys_are_typed():
    values = {"stage": "llm", "output_dir": "x", "visual_tokenizer": "vt",
              "model": {"config": {}, "image_vocab": {"variable_size": True, "max_grid_size": [6, 6]}}}
    recipe = recipe_from_dict(values)
    assert image_vocab_recipe(recipe.model) == ImageVocabRecipe(variable_size=True, max_grid_size=[6, 6])
    assert image_vocab_recipe({}) == ImageVocabRecipe()  # absent: today's fixed grid
    with pytest.raises(ValueError, match=r"unknown recipe key.*'order'.*model\.image_vocab"):
        recipe_from_dict({**values, "model": {"image_vocab": {"order": "level"}}})
    with pytest.raises(ValueError, match="layout must be one of"):
        recipe_from_dict({**values, "model": {"image_vocab": {"layout": "spiral"}}})
    with pytest.raises(ValueError, match="max_grid_size applies only with variable_size"):
        recipe_from_dict({**values, "model": {"image_vocab": {"max_grid_size": [4, 4]}}})


def visual_tokenizer(**options) -> VisualTokenizer:
    torch.manual_seed(0)
    return VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                                 image_size=32, kmeans_init=False, **options)).eval()


def test_bridge_picks_the_layout():
    llm = {"config": TINY_LLM}
    _, processor = bridge(llm, visual_tokenizer(), 32)
    vocab = processor.image_vocab
    assert (vocab.layout, vocab.grid_size, vocab.num_levels, vocab.variable_size) == ("grid", [4, 4], 1, False)

    residual = visual_tokenizer(residual_levels=2)
    vocab = bridge(llm, residual, 32)[1].image_vocab
    assert vocab.num_levels == 2 and vocab.separate_level_ranges and vocab.num_image_tokens == 32
    shared = visual_tokenizer(residual_levels=2, shared_codebook=True)
    assert not bridge(llm, shared, 32)[1].image_vocab.separate_level_ranges  # one codebook: one id range
    vocab = bridge({**llm, "image_vocab": {"level_order": "level", "variable_size": True, "max_grid_size": [6, 5]}},
                   residual, 32)[1].image_vocab
    assert (vocab.level_order, vocab.grid_size, vocab.extra[DEFAULT_IMAGE_SIZE_KEY]) == ("level", [6, 5], [4, 4])

    model, processor = bridge({**llm, "image_vocab": {"unified_codebook": "first"}}, visual_tokenizer(), 32)
    vocab = processor.image_vocab
    specials = set(processor.tokenizer.all_special_ids)
    assert vocab.is_unified and len(vocab.token_ids) == 16 and not specials & set(vocab.token_ids)
    assert max(vocab.token_ids) < vocab.text_vocab_size
    vocab = bridge({**llm, "image_vocab": {"factors": [4, 4]}}, visual_tokenizer(), 32)[1].image_vocab
    assert vocab.factors == [4, 4] and vocab.num_image_tokens == 8

    with pytest.raises(ValueError, match="larger than model.image_vocab.max_grid_size"):
        bridge({**llm, "image_vocab": {"variable_size": True, "max_grid_size": [3, 3]}}, visual_tokenizer(), 32)
    with pytest.raises(ValueError, match="layout: sequence needs a visual tokenizer that emits 1-D ids"):
        bridge({**llm, "image_vocab": {"layout": "sequence"}}, visual_tokenizer(), 32)


def test_model_image_init_codebook_gives_the_image_tokens_codebook_rows():
    llm = {"config": TINY_LLM}
    plain, processor = bridge(llm, visual_tokenizer(), 32)
    start, end = processor.image_vocab.id_range
    assert torch.equal(plain.get_input_embeddings().weight[start:end].std(0), torch.zeros(TINY_LLM["hidden_size"]))
    model, processor = bridge({**llm, "image_init": "codebook"}, visual_tokenizer(), 32)
    rows = model.get_input_embeddings().weight[start:end]
    assert rows.std(0).min() > 0 and len({tuple(r.tolist()) for r in rows}) == 16  # one distinct row per code
    head = model.get_output_embeddings().weight[start:end]
    assert torch.equal(head, head[:1].expand_as(head))  # the head keeps the mean rows
    with pytest.raises(ValueError, match="model.image_init must be one of"):
        bridge({**llm, "image_init": "random"}, visual_tokenizer(), 32)
    with pytest.raises(ValueError, match="codebook initialisation needs one new token per code"):
        bridge({**llm, "image_init": "codebook"}, visual_tokenizer(residual_levels=2), 32)


def test_the_recipe_section_fills_a_layout_from_the_visual_tokenizer():
    residual = visual_tokenizer(residual_levels=2)
    section = image_vocab_recipe({"image_vocab": {"level_order": "level", "factors": [4, 4]}})
    assert section.image_layout(residual, 32) == ImageLayout(codebook_size=16, grid_size=(4, 4), num_levels=2,
                                                             level_order="level", separate_level_ranges=True,
                                                             factors=[4, 4])
    variable = image_vocab_recipe({"image_vocab": {"variable_size": True, "max_grid_size": [6, 5]}})
    assert variable.image_layout(visual_tokenizer(), 32).grid_size == [6, 5]
    assert ImageVocabRecipe(separate_level_ranges=None) == ImageVocabRecipe()  # null: left to the tokenizer
    assert image_vocab_recipe({"image_vocab": {"separate_level_ranges": False}}).image_layout(
        residual, 32).separate_level_ranges is False
    # the layout's own rules, checked when the recipe loads, before any visual tokenizer is known
    with pytest.raises(ValueError, match="model.image_vocab: level_order must be one of"):
        image_vocab_recipe({"image_vocab": {"level_order": "depth"}})
    with pytest.raises(ValueError, match="model.image_vocab: variable_size applies to the grid layout only"):
        image_vocab_recipe({"image_vocab": {"layout": "sequence", "variable_size": True}})
    with pytest.raises(ValueError, match=r"unknown recipe key.*'num_levels'.*model\.image_vocab"):
        image_vocab_recipe({"image_vocab": {"num_levels": 3}})  # the visual tokenizer says how many levels
    with pytest.raises(ValueError, match=r"model.image_vocab: factors \[2, 4\] multiply to 8, not codebook_size=16"):
        image_vocab_recipe({"image_vocab": {"factors": [2, 4]}}).image_layout(visual_tokenizer(), 32)


def llm_recipe(out, vt_path, *extra):
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={out}", f"visual_tokenizer={vt_path}", "data.num_train=16", "train.batch_size=4",
        "train.steps=3", "train.warmup_steps=0", "train.lr=0.01", "train.log_every=1", "train.save_every=0",
        *(f"model.config.{k}={v}" for k, v in TINY_LLM.items()), *extra,
    ])


def test_llm_stage_trains_a_residual_tokenizer_with_levels(tmp_path):
    visual_tokenizer(residual_levels=2).save_pretrained(tmp_path / "vt")
    final, history = run(llm_recipe(tmp_path / "llm", tmp_path / "vt", "model.image_vocab.level_order=level"))
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    model, processor = load_bundle(final)
    vocab = processor.image_vocab
    assert (vocab.num_levels, vocab.level_order, vocab.separate_level_ranges) == (2, "level", True)
    ids = generate_image_ids(model.eval(), processor, ["a red circle at the top left"])
    assert ids.shape == (1, 4, 4, 2)
    assert processor.image_ids_to_images(list(ids))[0].size == (32, 32)
    card = (tmp_path / "llm" / "final" / "README.md").read_text()
    assert "grid 4x4 (one <eol> per row), 2 residual levels per position (level-major" in card
    assert "35 tokens = 32 image tokens (2 level ranges for 16 image ids per level) + 3 specials" in card


def test_llm_stage_trains_a_variable_grid_and_evaluates_it(tmp_path):
    visual_tokenizer().save_pretrained(tmp_path / "vt")
    final, history = run(llm_recipe(tmp_path / "llm", tmp_path / "vt", "model.image_vocab.variable_size=true",
                                    "model.image_vocab.max_grid_size=[6, 6]"))
    assert len(history) == 3
    model, processor = load_bundle(final)
    vocab = processor.image_vocab
    assert vocab.variable_size and vocab.grid_size == [6, 6] and vocab.extra[DEFAULT_IMAGE_SIZE_KEY] == [4, 4]
    assert evaluation_image_size(vocab, processor.visual_tokenizer) == 32
    ids = generate_image_ids(model.eval(), processor, ["a red circle", "blue"], image_size=[(4, 4), (2, 6)])
    assert [tuple(i.shape) for i in ids] == [(4, 4), (2, 6)]
    result = evaluate_bundle(final)
    assert result["image_size"] == 32 and result["image_tokens"]["uniform_perplexity"] == 16
    assert result["image_tokens"]["num_image_tokens"] > 0 and 0 <= result["llm"]["t2i_accuracy"] <= 1


def test_llm_stage_lora_with_a_unified_codebook(tmp_path):
    visual_tokenizer().save_pretrained(tmp_path / "vt")
    final, history = run(llm_recipe(tmp_path / "llm", tmp_path / "vt", "model.image_vocab.unified_codebook=first",
                                    "lora.enabled=true", "lora.r=2"))
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    model, processor = load_bundle(final)
    vocab = processor.image_vocab
    assert vocab.is_unified and len(model.get_input_embeddings().weight) == vocab.text_vocab_size + 3
    adapter = json.loads((tmp_path / "llm" / "final" / "adapter" / "adapter_config.json").read_text())
    assert sorted(set().union(*adapter["trainable_token_indices"].values())) == vocab.special_token_ids
    assert "3 tokens = 3 specials (<boi>, <eoi>, <eol>); the 16 image ids reuse existing text tokens" in \
        (tmp_path / "llm" / "final" / "README.md").read_text()
    assert generate_image_ids(model.eval(), processor, ["a red circle"]).shape == (1, 4, 4)
