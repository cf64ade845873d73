"""UnifiedProcessor against the facts transformers' common processor tests check (``ProcessorTesterMixin`` of
``tests/test_processing_common.py``), with our own fixtures: a word-level tokenizer, a 32 px visual tokenizer, a
bridged 4x4 image vocabulary. Each test names the mixin test it stands for.

Applies, and is here (adapted where our processor differs on purpose):
    test_processor_to_json_string, test_processor_from_and_save_pretrained, test_tokenizer_defaults_preserved_by_kwargs,
    test_image_processor_defaults_preserved_by_image_kwargs, test_kwargs_overrides_default_tokenizer_kwargs,
    test_kwargs_overrides_default_image_processor_kwargs, test_unstructured_kwargs, test_unstructured_kwargs_batched,
    test_doubly_passed_kwargs, test_structured_kwargs_nested, test_structured_kwargs_nested_from_dict,
    test_overlapping_text_image_kwargs_handling, test_chat_template_save_loading, test_apply_chat_template_image
    (batch 1 and 2, "np" and "pt"), test_model_input_names, test_processor_text_is_the_tokenizer.
Adaptation: the mixin reads ``pixel_values`` to see that image keywords arrived; our processor returns them only with
``return_pixel_values=True`` (the bridged LLM reads ids, and ``model(**batch)`` must not get pixels), so those tests
ask for them. Images come from the test (the mixin downloads a COCO photo). transformers 5.x always writes
``chat_template.jinja`` (there is no ``save_jinja_files=False`` any more), so the legacy ``chat_template.json`` is
checked on load only.
Inapplicable: the audio tests (``*_audio``, test_overlapping_text_audio_kwargs_handling, test_apply_chat_template_audio)
and the video tests (``*_video``, test_apply_chat_template_video, test_apply_chat_template_video_frame_sampling): the
processor has no feature extractor or video processor and refuses ``audio=`` / ``videos=`` values;
test_prepare_and_validate_optional_call_args: the processor has no ``optional_call_args``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mllm.data.tasks import TINY_CHAT_TEMPLATE
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm
from transformers import LlamaConfig, LlamaForCausalLM

WORDS = "lower newer upper older longer string describe this it is the sound of a red circle"
GRID = (4, 4)
SPAN = GRID[0] * (GRID[1] + 1) + 2  # <boi> + 4 rows of 4 ids and <eol> + <eoi>


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(tokenizer folder, image vocab, visual tokenizer): components the tests assemble processors from."""
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer([WORDS])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    vt = VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                               image_size=32)).eval()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    vocab = bridge_llm(model, tokenizer, 16, grid_size=GRID, tokenizer_fingerprint=vt.fingerprint())
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder, vocab, vt


def processor_of(parts, image_processor=None, chat_template=None, **tokenizer_kwargs) -> UnifiedProcessor:
    folder, vocab, vt = parts
    tokenizer = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)  # kwargs land in tokenizer.init_kwargs
    return UnifiedProcessor(image_processor or VisualTokenizerImageProcessor(size=32), tokenizer, vocab,
                            visual_tokenizer=vt, chat_template=chat_template)


def text_inputs(batch_size=None) -> list[str] | str:
    if batch_size is None:
        return "lower newer <image>"
    return ["lower newer <image>", " <image> upper older longer string"] + ["lower newer <image>"] * (batch_size - 2)


def image_inputs(batch_size=None):
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 255, (30, 40, 3), dtype=np.uint8))  # not the processor's size
    return image if batch_size is None else [image] * batch_size


def pixels_mean(inputs) -> float:
    return float(torch.as_tensor(inputs["pixel_values"][0][0]).float().mean())


# ---------------------------------------------------------------------------------------------------- persistence
def test_processor_to_json_string(parts):
    processor = processor_of(parts)
    processor.padding_side = "left"
    data = json.loads(processor.to_json_string())
    assert data["processor_class"] == "UnifiedProcessor" and data["padding_side"] == "left"
    assert data["image_processor"]["size"] == {"height": 32, "width": 32}
    assert "chat_template" not in data  # saved in its own file


def test_processor_from_and_save_pretrained(parts, tmp_path):
    first = processor_of(parts)
    files = first.save_pretrained(tmp_path)
    json.loads(open(files[0]).read())  # the first file is well-formed JSON
    second = UnifiedProcessor.from_pretrained(tmp_path)
    assert second.to_dict() == first.to_dict()
    assert repr(second.image_processor) == repr(first.image_processor)
    batch = dict(text=text_inputs(2), images=image_inputs(2), padding=True, return_tensors="pt")
    assert torch.equal(first(**batch)["input_ids"], second(**batch)["input_ids"])


def test_from_pretrained_routes_load_time_kwargs(parts, tmp_path):
    processor_of(parts).save_pretrained(tmp_path)
    loaded = UnifiedProcessor.from_pretrained(tmp_path, do_normalize=False, padding_side="left", cls_token="<cls>")
    assert loaded.image_processor.do_normalize is False and loaded.padding_side == "left"
    assert loaded.tokenizer.cls_token == "<cls>"
    assert UnifiedProcessor.from_pretrained(tmp_path).image_processor.do_normalize is True


# ---------------------------------------------------------------------------------------------------- kwargs merging
def test_tokenizer_defaults_preserved_by_kwargs(parts):
    processor = processor_of(parts, max_length=117, padding="max_length")
    inputs = processor(text=text_inputs(), images=image_inputs(), return_tensors="pt")
    assert inputs["input_ids"].shape[-1] == 117


def test_image_processor_defaults_preserved_by_image_kwargs(parts):
    image_processor = VisualTokenizerImageProcessor(size=32, do_rescale=True, rescale_factor=-1.0)
    processor = processor_of(parts, image_processor, max_length=117, padding="max_length")
    inputs = processor(text=text_inputs(), images=image_inputs(), return_tensors="pt", return_pixel_values=True)
    assert pixels_mean(inputs) <= 0 and inputs["input_ids"].shape[-1] == 117


def test_kwargs_overrides_default_tokenizer_kwargs(parts):
    processor = processor_of(parts, padding="longest")
    inputs = processor(text=text_inputs(), images=image_inputs(), return_tensors="pt", max_length=112,
                       padding="max_length")
    assert inputs["input_ids"].shape[-1] == 112


def test_kwargs_overrides_default_image_processor_kwargs(parts):
    image_processor = VisualTokenizerImageProcessor(size=32, do_rescale=True, rescale_factor=1)
    processor = processor_of(parts, image_processor, max_length=117, padding="max_length")
    plain = processor(text=text_inputs(), images=image_inputs(), return_tensors="pt", return_pixel_values=True)
    inputs = processor(text=text_inputs(), images=image_inputs(), do_rescale=True, rescale_factor=-1.0,
                       return_tensors="pt", return_pixel_values=True)
    assert pixels_mean(plain) > 0 >= pixels_mean(inputs)
    assert not torch.equal(plain["input_ids"], inputs["input_ids"])  # the override reached the encoded image too


def test_unstructured_kwargs(parts):
    inputs = processor_of(parts)(text=text_inputs(), images=image_inputs(), return_tensors="pt", do_rescale=True,
                                 rescale_factor=-1.0, padding="max_length", max_length=76, return_pixel_values=True)
    assert pixels_mean(inputs) <= 0 and inputs["input_ids"].shape[-1] == 76


def test_unstructured_kwargs_batched(parts):
    inputs = processor_of(parts)(text=text_inputs(2), images=image_inputs(2), return_tensors="pt", do_rescale=True,
                                 rescale_factor=-1.0, padding="longest", max_length=76, return_pixel_values=True)
    assert pixels_mean(inputs) <= 0
    assert len(inputs["input_ids"][0]) == len(inputs["input_ids"][1]) < 76


def test_doubly_passed_kwargs(parts):
    with pytest.raises(ValueError, match="passed two times"):
        processor_of(parts)(text=[text_inputs()], images=image_inputs(), images_kwargs={"do_rescale": True,
                            "rescale_factor": -1.0}, do_rescale=True, return_tensors="pt")


@pytest.mark.parametrize("nested", ["literal", "from_dict"])
def test_structured_kwargs_nested(parts, nested):
    all_kwargs = {"common_kwargs": {"return_tensors": "pt"},
                  "images_kwargs": {"do_rescale": True, "rescale_factor": -1.0, "return_pixel_values": True},
                  "text_kwargs": {"padding": "max_length", "max_length": 76}}
    if nested == "from_dict":
        all_kwargs = json.loads(json.dumps(all_kwargs))
    inputs = processor_of(parts)(text=text_inputs(), images=image_inputs(), **all_kwargs)
    assert pixels_mean(inputs) <= 0 and inputs["input_ids"].shape[-1] == 76
    assert isinstance(inputs["pixel_values"], torch.Tensor)


def test_overlapping_text_image_kwargs_handling(parts):
    with pytest.raises(ValueError, match="passed two times"):
        processor_of(parts)(text=text_inputs(), images=image_inputs(), return_tensors="pt", padding="max_length",
                            text_kwargs={"padding": "do_not_pad"})


# ---------------------------------------------------------------------------------------------------- call semantics
def test_processor_text_is_the_tokenizer(parts):
    processor = processor_of(parts)
    for text in ("lower newer string", ["lower newer", "a red circle of the sound"]):
        batch = [text] if isinstance(text, str) else text  # a string is a batch of one, as in multimodal processors
        assert processor(text=text).data == {k: v for k, v in processor.tokenizer(batch).items()
                                             if k in ("input_ids", "attention_mask")}
    assert processor(text=["lower newer"], padding=True, return_tensors="pt")["input_ids"].tolist() == \
        processor.tokenizer(["lower newer"], padding=True, return_tensors="pt")["input_ids"].tolist()
    out = processor(text="lower <image>", images=image_inputs())
    assert "labels" not in out and len(out["input_ids"][0]) == 1 + 1 + SPAN  # <bos> lower + span, no EOS
    training = processor(text="lower <image>", target="a red circle", images=image_inputs())
    (labels,), (ids,) = training["labels"], training["input_ids"]
    assert labels[-4:] == ids[-4:] and labels[-1] == processor.tokenizer.eos_token_id
    assert labels[: 2 + SPAN] == [-100] * (2 + SPAN)


def test_model_input_names(parts):
    processor = processor_of(parts)
    inputs = processor(text=text_inputs(), images=image_inputs())
    assert set(inputs) == set(processor.model_input_names) == {"input_ids", "attention_mask"}


def test_prompt_keyword_names_its_replacements_and_videos_are_refused(parts):
    processor = processor_of(parts)
    with pytest.raises(TypeError, match="target="):
        processor(prompt=["lower"], text=["newer"])
    with pytest.raises(ValueError, match="videos= and audio= must be None"):
        processor(text="lower", videos=[np.zeros((2, 3, 8, 8))])
    assert processor(text="lower", videos=None, audio=None)["input_ids"] == processor(text="lower")["input_ids"]
    assert processor(images=None, text=None, target="lower")["labels"][0][-1] == processor.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="text keyword"):
        processor(text="lower", return_offsets_mapping=True)


def test_image_token_and_the_number_of_multimodal_tokens(parts):
    processor = processor_of(parts)
    assert processor.image_token == "<image>" and processor.image_token_id == processor.image_vocab.boi_token_id
    counts = processor._get_num_multimodal_tokens(image_sizes=[(30, 40), (256, 512)])
    assert counts.num_image_tokens == [SPAN, SPAN]
    ids = processor(text=["<image>"], images=image_inputs(1))["input_ids"][0]
    assert len(ids) - 1 == SPAN  # after <bos>


def test_post_process_image_text_to_text_returns_images(parts):
    processor = processor_of(parts)
    ids = torch.tensor(processor(text=["lower <image>"], images=image_inputs(1))["input_ids"])
    (pieces,) = processor.post_process_image_text_to_text(ids)
    assert pieces[0] == "lower" and isinstance(pieces[1], Image.Image) and pieces[1].size == (32, 32)


# ---------------------------------------------------------------------------------------------------- chat templates
def test_chat_template_save_loading(parts, tmp_path):
    processor = processor_of(parts)
    tokenizer_template = processor.tokenizer.chat_template
    processor.chat_template = "test template"
    processor.save_pretrained(tmp_path / "one")
    assert (tmp_path / "one" / "chat_template.jinja").read_text() == "test template"
    assert not (tmp_path / "one" / "chat_template.json").exists()
    reloaded = UnifiedProcessor.from_pretrained(tmp_path / "one")
    assert reloaded.chat_template == "test template" == reloaded.tokenizer.chat_template  # one file, shared

    processor.chat_template = {"default": "a", "secondary": "b"}
    processor.save_pretrained(tmp_path / "two")
    assert (tmp_path / "two" / "additional_chat_templates" / "secondary.jinja").is_file()
    assert UnifiedProcessor.from_pretrained(tmp_path / "two").chat_template == {"default": "a", "secondary": "b"}

    # without a template of its own the saved file is the tokenizer's: it loads as the tokenizer's, not the processor's
    processor.chat_template = None
    processor.save_pretrained(tmp_path / "none")
    assert (tmp_path / "none" / "chat_template.jinja").read_text() == tokenizer_template == TINY_CHAT_TEMPLATE
    reloaded = UnifiedProcessor.from_pretrained(tmp_path / "none")
    assert reloaded.chat_template is None and reloaded.tokenizer.chat_template == TINY_CHAT_TEMPLATE

    # the legacy file of earlier transformers versions still loads (in a folder of an earlier version of ours)
    config = json.loads((tmp_path / "none" / "processor_config.json").read_text())
    del config["own_chat_template"]
    (tmp_path / "none" / "processor_config.json").write_text(json.dumps(config))
    (tmp_path / "none" / "chat_template.jinja").unlink()
    (tmp_path / "none" / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert UnifiedProcessor.from_pretrained(tmp_path / "none").chat_template == "legacy"


def conversation(with_image: bool):
    content = [{"type": "text", "text": "describe this"}]
    if with_image:
        content.append({"type": "image", "image": image_inputs()})
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("own_template", [False, True])
@pytest.mark.parametrize("batch_size,return_tensors", [(1, "np"), (1, "pt"), (2, "np"), (2, "pt")])
def test_apply_chat_template_image(parts, batch_size, return_tensors, own_template):
    # without a template of its own the processor wraps its tokenizer's; with one it uses that
    template = None
    if own_template:
        template = ("{% for m in messages %}{{ m['role'] }} : {% for p in m['content'] %}{% if p['type'] == 'text' %}"
                    "{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %} {{ eos_token }} {% endfor %}"
                    "{% if add_generation_prompt %}assistant : {% endif %}")
    processor = processor_of(parts, chat_template=template)
    text_only = [conversation(False)] * batch_size
    prompt = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
    assert len(prompt) == batch_size and prompt[0].endswith("assistant : ")
    if not own_template:  # text-only conversations render exactly as the tokenizer renders their text
        as_strings = [[{"role": "user", "content": "describe this"}]] * batch_size
        assert prompt == processor.tokenizer.apply_chat_template(as_strings, add_generation_prompt=True,
                                                                 tokenize=False)
    ids = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True,
                                        return_tensors=return_tensors)
    add_special = not prompt[0].startswith(processor.tokenizer.bos_token)
    expected = processor.tokenizer(prompt, return_tensors=return_tensors, add_special_tokens=add_special)
    assert expected["input_ids"].tolist() == ids.tolist()
    padded = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True,
                                           padding="max_length", truncation=True, max_length=100,
                                           return_tensors=return_tensors)
    assert len(padded[0]) == 100

    with_images = [conversation(True)] * batch_size
    out = processor.apply_chat_template(with_images, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors=return_tensors)
    assert set(out) >= {"input_ids", "attention_mask"} and len(out["input_ids"]) == batch_size
    kind = torch.Tensor if return_tensors == "pt" else np.ndarray
    assert all(isinstance(out[k], kind) for k in out)
    row = torch.as_tensor(out["input_ids"][0]).tolist()
    spans = processor.decode_image_ids(row)
    direct = processor(images=image_inputs(1), return_tensors="pt", add_special_tokens=not prompt[0].startswith(
        processor.tokenizer.bos_token), text=[prompt[0].replace("describe this", "describe this<image>")])["input_ids"][0]
    assert len(spans) == 1 and row == direct.tolist()  # the image part became its span where it stood

    continued = [conversation(False) + [{"role": "assistant", "content": [{"type": "text",
                                                                          "text": "it is the sound of"}]}]]
    (prompt,) = processor.apply_chat_template(continued, continue_final_message=True, tokenize=False)
    assert prompt.endswith("it is the sound of")


# ---------------------------------------------------------------------------------------------------- the Hub
def test_save_pretrained_with_push_to_hub_uploads_a_repository_that_loads(parts, fake_hub, tmp_path, monkeypatch):
    from transformers.utils.hub import hf_api

    from tests.hub_stand_in import FakeHub, hub_cache

    monkeypatch.setattr(hf_api(), "endpoint", fake_hub)
    processor = processor_of(parts, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    processor.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="org/proc", token="hf_test")
    local = {p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
             for p in sorted((tmp_path / "local").rglob("*")) if p.is_file()}
    assert FakeHub.files == local  # uploaded after every file was written, the visual tokenizer's included
    assert {"image_vocab.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
            "visual_tokenizer/model.safetensors", "visual_tokenizer/config.json"} <= set(FakeHub.files)
    # the pushed bytes, as huggingface_hub caches a download of the repository, load by repo id
    hub_cache(tmp_path / "hf", "org/proc", "c" * 40, FakeHub.files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    loaded = UnifiedProcessor.from_pretrained("org/proc", cache_dir=str(tmp_path / "hf" / "hub"),
                                              local_files_only=True)
    batch = dict(text=text_inputs(2), images=image_inputs(2), padding=True, return_tensors="pt")
    assert torch.equal(loaded(**batch)["input_ids"], processor(**batch)["input_ids"])
    assert loaded.chat_template == processor.chat_template
    with pytest.raises(OSError, match="no local directory, and downloading it from the Hub failed"):
        UnifiedProcessor.from_pretrained("org/missing", cache_dir=str(tmp_path / "hf" / "hub"),
                                         local_files_only=True)
