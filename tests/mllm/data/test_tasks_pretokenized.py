"""The llm stage trains the interleaved and instruction tasks on pre-tokenized documents and conversations: every
example is one record as it was written (loss after the document's prefix, on the assistant turns of a conversation),
batches are the stage's processor encoding of those examples, and a mixture with tasks the records cannot feed is
refused."""

import json
import math
import random

import pytest

from mllm.bundle.bundle import load_bundle
from mllm.data import pretokenize as pt
from mllm.data.conversation import encode_examples
from mllm.data.records import pretokenized_records
from mllm.data.tasks import Conversation, Document, make_example
from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from mllm.training.stage import step_indices
from mllm.training.stages.llm import build_llm_stage
from tokenizer_bridge import VisualTokenizer
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values

TASK = {"documents": "interleaved", "conversations": "instruction"}


@pytest.fixture(scope="module")
def pretokenized(kind_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretok_kinds")
    for kind, source in kind_data.sources.items():
        pt.pretokenize(source.path, str(root / kind), pt.PretokenizeSettings(visual_tokenizer=kind_data.tokenizer))
    return {kind: root / kind for kind in kind_data.sources}


def llm_recipe(tmp_path, kind_data, data_path, tasks, *extra):
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={kind_data.tokenizer}", "data.dataset=pretokenized",
        f"data.path={data_path}", f"data.tasks={json.dumps(tasks)}", "data.num_train=0", "train.steps=3",
        "train.batch_size=4", "train.save_every=0", "train.warmup_steps=0", "model.config.hidden_size=32",
        "model.config.intermediate_size=64", "model.config.num_hidden_layers=1", *extra])


def labelled(sample: dict) -> list:
    return [t for t in sample["labels"] if t != -100]


@pytest.mark.parametrize("kind", ["documents", "conversations"])
def test_the_llm_stage_trains_each_kind_on_its_own_task(kind_data, pretokenized, tmp_path, kind):
    recipe = llm_recipe(tmp_path, kind_data, pretokenized[kind], {TASK[kind]: 1})
    path, history = run(recipe)
    assert [h["step"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)
    _, processor = load_bundle(path)
    records = pretokenized_records(recipe, VisualTokenizer.from_pretrained(kind_data.tokenizer))
    assert len(records) == len(kind_data.sources[kind].expected)
    assert all(isinstance(records[i], Document if kind == "documents" else Conversation) for i in range(len(records)))
    batch = build_llm_stage(recipe).batch_for_step(1, 0, 1)
    chosen = step_indices(1, 4, len(records), recipe.train.seed).tolist()
    for row, i in enumerate(chosen):  # each sample is its record's own example, nothing synthesized
        want = encode_examples(processor, [make_example(TASK[kind], [records[i]], 0.0, random.Random(0),
                                                        processor.tokenizer)])[0]
        n = len(want["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == want["input_ids"]
        assert batch["labels"][row, :n].tolist() == want["labels"]
        assert (batch["labels"][row, n:] == -100).all()


def test_loss_is_after_the_prefix_and_on_assistant_turns(kind_data, pretokenized, tmp_path):
    ids = VisualTokenizer.from_pretrained(kind_data.tokenizer).encode(to_pixel_values(kind_data.images))  # (6, 4, 4)
    path, _ = run(llm_recipe(tmp_path, kind_data, pretokenized["documents"], {"interleaved": 1}, "train.steps=1"))
    _, processor = load_bundle(path)
    tok, eos = processor.tokenizer, processor.tokenizer.eos_token_id

    def words(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def span(k):
        return processor.image_vocab.build_span(ids[k]).tolist()

    def sample(kind, source_index):
        recipe = llm_recipe(tmp_path, kind_data, pretokenized[kind], {TASK[kind]: 1})
        records = pretokenized_records(recipe, VisualTokenizer.from_pretrained(kind_data.tokenizer))
        position = sorted(kind_data.sources[kind].expected).index(source_index)
        example = make_example(TASK[kind], [records[position]], 0.0, random.Random(0), tok)
        return encode_examples(processor, [example])[0]

    # document 8: [img 5, "a blue circle", img 0, "a red circle", img 1] with prefix 2
    document = sample("documents", 8)
    assert labelled(document) == span(0) + words("a red circle") + span(1) + [eos]
    assert document["input_ids"][: 1 + len(span(5))] == [tok.bos_token_id] + span(5)
    # conversation 1 (LLaVA images list): "<image> caption:" -> "a blue square", "draw: ..." -> "<image>" (img 2)
    chat = sample("conversations", 1)
    assert labelled(chat) == words("a blue square") + [eos] + span(2) + [eos]
    assert chat["input_ids"].count(processor.image_vocab.boi_token_id) == 2


@pytest.mark.parametrize("kind, tasks", [("documents", {"interleaved": 1, "captioning": 1}),
                                         ("conversations", {"interleaved": 1}),
                                         ("conversations", {"instruction": 1, "decompression": 0.5})])
def test_a_mixture_the_records_cannot_feed_is_refused(kind_data, pretokenized, tmp_path, kind, tasks):
    with pytest.raises(ValueError, match=f"feed the {TASK[kind]} task only"):
        build_llm_stage(llm_recipe(tmp_path, kind_data, pretokenized[kind], tasks))
    with pytest.raises(ValueError, match="feeds the instruction task, not 'captioning'"):
        make_example("captioning", [Conversation(({"role": "user", "content": "hi"},))], 0.0, random.Random(0))
