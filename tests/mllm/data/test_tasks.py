"""The task builders (captioning, text-to-image with prompt dropout, decompression, interleaved documents, chat
instruction tuning), their labels, the mixture over every task, and the llm stage trained from a pre-tokenized
dataset of task records."""

import json
import math
import random

import numpy as np
import pytest
import torch

from mllm.data import conversation, shapes, tasks
from mllm.data import pretokenize as pt
from mllm.data.tasks import PLACEHOLDER, Record
from mllm.model import shapes_vocabulary
from mllm.text_tokenizers import build_word_tokenizer
from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from mllm.training.stages.llm import build_llm_stage
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import add_image_tokens

ALL_TASKS = {"captioning": 1, "text_to_image": 1, "decompression": 1, "interleaved": 1, "instruction": 1}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_word_tokenizer(shapes_vocabulary(ALL_TASKS))
    tokenizer.chat_template = tasks.TINY_CHAT_TEMPLATE
    vocab = add_image_tokens(tokenizer, 16, grid_size=(4, 4))
    return UnifiedProcessor(VisualTokenizerImageProcessor(size=32), tokenizer, vocab)


def ids(seed):
    return torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(seed))


def words(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def span(processor, image_ids):
    return processor.image_vocab.build_span(image_ids).tolist()


def encode(processor, examples):
    return conversation.pad(processor, conversation.encode_examples(processor, examples))


def labelled(batch, row=0):
    return [t for t in batch["labels"][row].tolist() if t != -100]


def test_compress_pixels_keeps_low_frequencies_only():
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(tasks.compress_pixels(flat), flat)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1  # finest detail: a 1-px checkerboard
    out = tasks.compress_pixels(checker.expand(1, 3, 8, 8))
    assert out.shape == (1, 3, 8, 8) and out.abs().max() < 1e-6  # gone entirely
    with pytest.raises(ValueError, match="multiples of 2"):
        tasks.compress_pixels(torch.zeros(1, 3, 7, 8))


def test_decompression_target_is_the_full_image_span(processor):
    full, compressed = ids(0), ids(1)
    ex = tasks.decompression(full, compressed)
    assert (ex.prompt, ex.target, ex.task, ex.num_images) == ("<image> decompress:", "<image>", "decompression", 2)
    batch = encode(processor, [ex])
    tok = processor.tokenizer
    prompt = [tok.bos_token_id] + span(processor, compressed) + words(processor, "decompress:")
    assert batch["input_ids"][0].tolist() == prompt + span(processor, full) + [tok.eos_token_id]
    assert labelled(batch) == span(processor, full) + [tok.eos_token_id]
    with pytest.raises(ValueError, match="one shape"):
        tasks.decompression(full, torch.zeros(2, 2, dtype=torch.long))


def test_interleaved_loss_after_the_prefix(processor):
    a, b = ids(2), ids(3)
    doc = tasks.interleaved(["a red circle", a, "a blue square", b], prefix=1)
    assert (doc.prompt, doc.target) == ("a red circle", "<image> a blue square <image>")
    batch = encode(processor, [doc, tasks.interleaved(["a red circle", a, "a blue square", b])])
    eos = processor.tokenizer.eos_token_id
    body = span(processor, a) + words(processor, "a blue square") + span(processor, b) + [eos]
    assert labelled(batch, 0) == body
    assert labelled(batch, 1) == words(processor, "a red circle") + body  # no prefix: everything but BOS
    with pytest.raises(ValueError, match="at least one"):
        tasks.interleaved(["a red circle", a], prefix=2)
    with pytest.raises(ValueError, match="must not contain"):
        tasks.interleaved([f"a {PLACEHOLDER}", a])


def test_caption_document_pairs_each_caption_with_its_image(processor):
    records = [Record("a red circle at the top left", ids(4)), Record("a blue square at the top right", ids(5))]
    doc = tasks.caption_document(records, random.Random(0))
    assert doc.prompt == "" and doc.num_images == 2 and len(doc.images) == 2
    assert torch.equal(doc.images[0], ids(4)) and torch.equal(doc.images[1], ids(5))
    for r in records:
        assert r.caption in doc.target


def test_chat_split_follows_the_template():
    tokenizer = build_word_tokenizer(["a red circle"])
    tokenizer.chat_template = CHATML
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image> caption:"},
                {"role": "assistant", "content": "a red circle"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "<image>"}]
    pairs = conversation.split_conversation(tokenizer, messages)
    assert pairs == [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<image> caption:<|im_end|>\n<|im_start|>assistant\n",
         "a red circle<|im_end|>\n"),
        ("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n", "<image><|im_end|>\n"),
    ]
    assert "".join(p + t for p, t in pairs) == tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="no assistant turn"):
        conversation.split_conversation(tokenizer, messages[:2])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        conversation.split_conversation(tokenizer, messages)


def test_instruction_loss_only_on_assistant_turns(processor):
    tok = processor.tokenizer
    first, second = ids(6), ids(7)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption:"}]},
                {"role": "assistant", "content": "a red circle at the top left"},
                {"role": "user", "content": "draw: a blue square"},
                {"role": "assistant", "content": PLACEHOLDER}]
    ex = tasks.instruction(messages, tok, [first, second])
    assert ex.chat and len(ex.pairs) == 2 and ex.num_images == 2
    batch = encode(processor, [ex])
    assert labelled(batch) == (words(processor, "a red circle at the top left") + [tok.eos_token_id]
                               + span(processor, second) + [tok.eos_token_id])
    # the whole sequence is the rendered conversation with each placeholder replaced by its span
    plain = [{"role": m["role"], "content": conversation.message_text(m["content"])} for m in messages]
    rendered = tok.apply_chat_template(plain, tokenize=False)
    before, middle, after = rendered.split(PLACEHOLDER)
    expected = words(processor, before) + span(processor, first) + words(processor, middle) + span(processor, second)
    assert batch["input_ids"][0].tolist() == expected + words(processor, after)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        tasks.instruction(messages, tok, [first])


def test_mixture_reaches_every_task(processor):
    rng = random.Random(0)
    picks = [tasks.choose_task({**ALL_TASKS, "decompression": 3}, rng) for _ in range(7000)]
    assert set(picks) == set(ALL_TASKS) and 0.38 < picks.count("decompression") / 7000 < 0.48
    records = [Record("a red circle at the top left", ids(8), ids(9)), Record("a blue square at the top right", ids(10))]
    examples = []
    for name in ALL_TASKS:
        ex = tasks.make_example(name, records[: tasks.records_needed(name)], 0.0, rng, processor.tokenizer)
        assert ex.task == name and len(ex.images) == ex.num_images > 0
        examples.append(ex)
    batch = encode(processor, examples)
    assert batch["input_ids"].shape[0] == 5 and ((batch["labels"] != -100).sum(1) > 0).all()
    assert tasks.make_example("captioning", "a red circle", 0.0, rng).images == ()  # caption alone: caller adds the image
    with pytest.raises(ValueError, match="compressed image ids"):
        tasks.make_example("decompression", records[1:], 0.0, rng)
    with pytest.raises(ValueError, match="chat template"):
        tasks.make_example("instruction", records, 0.0, rng)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_example("vqa", records, 0.0, rng)


# ------------------------------------------------------------------------------------------ llm stage
@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory):
    """A random tiny visual tokenizer and 16 shapes images pre-tokenized with compressed ids: (tokenizer, folder)."""
    root = tmp_path_factory.mktemp("pretok")
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(root / "vt")
    rng = np.random.default_rng(0)
    lines = []
    for k, spec in enumerate(shapes.ShapeSpec(c, s, "top left") for c in ("red", "green", "blue", "cyan")
                             for s in ("circle", "square", "triangle", "circle")):
        shapes.render(spec, size=32, rng=rng).save(root / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "caption": spec.caption}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    settings = pt.PretokenizeSettings(visual_tokenizer=str(root / "vt"), compressed=True)
    pt.pretokenize(str(root / "captions.jsonl"), str(root / "out"), settings)
    return root / "vt", root / "out"


def llm_recipe(tmp_path, tokenizer, data_path, *extra):
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tokenizer}", "data.dataset=pretokenized",
        f"data.path={data_path}", f"data.tasks={json.dumps(ALL_TASKS)}", "train.steps=3", "train.batch_size=8",
        "train.save_every=0", "train.warmup_steps=0", "model.config.hidden_size=32",
        "model.config.intermediate_size=64", "model.config.num_hidden_layers=1", *extra])


def test_llm_stage_trains_from_a_pretokenized_dataset(pretokenized, tmp_path):
    tokenizer, data_path = pretokenized
    recipe = llm_recipe(tmp_path, tokenizer, data_path)
    stage = build_llm_stage(recipe)
    batch, again = stage.batch_for_step(1, 0, 1), stage.batch_for_step(1, 0, 1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert batch["input_ids"].shape[0] == 8 and ((batch["labels"] != -100).sum(1) > 0).all()
    path, history = run(recipe)
    assert [h["step"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)
    assert (tmp_path / "llm" / "final" / "image_vocab.json").exists()


def test_llm_stage_refuses_ids_of_another_tokenizer(pretokenized, tmp_path):
    _, data_path = pretokenized
    torch.manual_seed(1)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(tmp_path / "other")
    with pytest.raises(pt.FingerprintMismatchError, match="different codebook"):
        build_llm_stage(llm_recipe(tmp_path, tmp_path / "other", data_path))
    with pytest.raises(ValueError, match="data.image_size"):
        build_llm_stage(llm_recipe(tmp_path, pretokenized[0], data_path, "data.image_size=64"))
    with pytest.raises(ValueError, match="needs data.path"):
        load_recipe("recipes/demo_llm.yaml", [f"visual_tokenizer={tmp_path}", "data.dataset=pretokenized"])


def test_captioning_and_text_to_image_examples():
    ex = tasks.captioning(" a red circle at the top left ")
    assert (ex.prompt, ex.target, ex.num_images) == ("<image> caption:", "a red circle at the top left", 1)
    t2i = tasks.text_to_image("a red circle at the top left")
    assert (t2i.prompt, t2i.target, t2i.num_images) == ("draw: a red circle at the top left", "<image>", 1)
    assert tasks.t2i_prompt("a red circle at the top left") == t2i.prompt
    assert tasks.t2i_prompt(None) == "draw:"
    with pytest.raises(ValueError, match="non-empty caption"):
        tasks.captioning("  ")



def test_prompt_dropout_rate():
    rng = random.Random(0)
    dropped = sum(tasks.text_to_image("a blue square", 0.3, rng).prompt == "draw:" for _ in range(2000))
    assert 0.25 < dropped / 2000 < 0.35
    assert all(tasks.text_to_image("a blue square", 0.0, rng).prompt != "draw:" for _ in range(100))



def test_task_mixture():
    rng = random.Random(1)
    picks = [tasks.choose_task({"captioning": 3, "text_to_image": 1}, rng) for _ in range(4000)]
    assert 0.7 < picks.count("captioning") / 4000 < 0.8
    with pytest.raises(ValueError, match="unknown task"):
        tasks.choose_task({"vqa": 1}, rng)
    with pytest.raises(ValueError, match="no positive weight"):
        tasks.choose_task({"captioning": 0}, rng)
