"""Typed recipes: the repository's recipes load, overrides are typed and nested, bad recipes fail before training."""

import pytest

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




@pytest.mark.parametrize("name", sorted(p.name for p in __import__("pathlib").Path("recipes").glob("*.yaml")))
def test_every_repository_recipe_loads_once_its_required_paths_are_given(name):
    required = {"llm": ["visual_tokenizer=tok", "model.base=llm", "data.path=data"], "tokenizer": ["data.path=images"]}
    from yaml import safe_load

    values = safe_load(open(f"recipes/{name}"))
    stage = values["stage"]
    perceptual = ["perceptual.backbone=backbone"] if (values.get("model") or {}).get("perceptual_weight") else []
    recipe = load_recipe(f"recipes/{name}", required[stage] + perceptual)
    assert recipe.stage == stage and recipe.train.steps > 0
