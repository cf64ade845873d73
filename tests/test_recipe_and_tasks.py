import random

import pytest

from mllm.data import tasks
from mllm.training.recipe import (
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    save_recipe,
)


def test_recipes_in_repo_load(tmp_path):
    tok = load_recipe("recipes/tokenizer_conv_vq.yaml")
    llm = load_recipe("recipes/demo_llm.yaml")
    assert tok.stage == "tokenizer" and tok.model["codebook_size"] == 256 and tok.train.steps > 0
    assert llm.stage == "llm" and llm.visual_tokenizer and llm.data.tasks == {"captioning": 0.5, "text_to_image": 0.5}
    save_recipe(llm, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == llm


def test_overrides_are_typed_and_nested():
    values = apply_overrides({"stage": "tokenizer", "output_dir": "x"}, ["train.steps=7", "train.lr=0.5", "model.codebook_size=64"])
    recipe = recipe_from_dict(values)
    assert recipe.train.steps == 7 and recipe.train.lr == 0.5 and recipe.model == {"codebook_size": 64}


@pytest.mark.parametrize(
    "values,match",
    [
        ({"stage": "tokenizer", "output_dir": "x", "trian": {}}, r"unknown recipe key\(s\) \['trian'\]"),
        ({"stage": "tokenizer", "output_dir": "x", "train": {"stpes": 3}}, r"\['stpes'\] in section 'train'"),
        ({"stage": "nope", "output_dir": "x"}, "stage must be one of"),
        ({"stage": "llm", "output_dir": "x"}, "needs `visual_tokenizer:`"),
        ({"stage": "tokenizer", "output_dir": "x", "data": 3}, "must be a mapping"),
    ],
)
def test_bad_recipes_fail_before_training(values, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_dict(values)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["train.steps"])


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
