"""Typed recipes: the repository's recipes load, overrides are typed and nested, bad recipes fail before training."""

import pytest
import torch

from mllm.data import photos
from mllm.training.recipe import (
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    save_recipe,
)
from mllm.training.stages.tokenizer import tokenizer_training_pixels
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values


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
        ({"stage": "tokenizer", "output_dir": "x", "data": {"photo_crop_scale": [0.5, 0.2]}}, "photo_crop_scale"),
        ({"stage": "tokenizer", "output_dir": "x", "data": {"photo_crop_scale": [0.5]}}, "photo_crop_scale"),
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


def test_photo_crop_scale_sets_the_zoom_of_the_photo_crops():
    def recipe(scale):
        return recipe_from_dict({"stage": "tokenizer", "output_dir": "x", "data": {
            "num_train": 6, "photo_fraction": 1.0, "image_size": 16, "photo_crop_scale": scale}})

    wide, narrow = tokenizer_training_pixels(recipe([0.9, 1.0])), tokenizer_training_pixels(recipe([0.01, 0.02]))
    assert wide.shape == narrow.shape == (6, 3, 16, 16)
    expected = photos.random_crops(photos.photo_splits()[0], 16, 6, seed=0, scale=(0.01, 0.02))
    assert (narrow - to_pixel_values(expected)).abs().max() < 1e-6
    # a crop of 1-2% of a photo is smoother (less detail per pixel) than one of 90-100%
    def roughness(pixels):
        return (pixels[..., 1:] - pixels[..., :-1]).abs().mean()

    assert roughness(narrow) < roughness(wide)



def test_photo_size_gives_whole_steps_of_photos_at_their_own_size():
    from mllm.training.stages.tokenizer import in_memory_batches

    recipe = recipe_from_dict({"stage": "tokenizer", "output_dir": "x", "train": {"batch_size": 4, "seed": 3},
                               "data": {"num_train": 20, "photo_fraction": 0.25, "image_size": 16, "photo_size": 32}})
    batch_for_step, _ = in_memory_batches(recipe)
    sizes = [batch_for_step(step, 0, 1)["pixel_values"].shape for step in range(200)]
    assert set(sizes) == {(4, 3, 16, 16), (4, 3, 32, 32)}
    share = sum(s[-1] == 32 for s in sizes) / len(sizes)
    assert 0.15 < share < 0.35  # about photo_fraction of the steps are photo steps
    # a pure function of (seed, step): a resumed run sees the same batches; two ranks split one step's batch
    assert torch.equal(batch_for_step(7, 0, 1)["pixel_values"], in_memory_batches(recipe)[0](7, 0, 1)["pixel_values"])
    halves = [batch_for_step(7, rank, 2)["pixel_values"] for rank in (0, 1)]
    assert sum(h.shape[0] for h in halves) == 4
    # photos only: every step is a photo step at photo_size (not image_size)
    only_photos = recipe_from_dict({"stage": "tokenizer", "output_dir": "x", "train": {"batch_size": 4},
                                    "data": {"num_train": 8, "photo_fraction": 1.0, "image_size": 16, "photo_size": 32}})
    assert {in_memory_batches(only_photos)[0](step, 0, 1)["pixel_values"].shape for step in range(5)} == {(4, 3, 32, 32)}
    with pytest.raises(ValueError, match="data.photo_size must be a positive integer"):
        recipe_from_dict({"stage": "tokenizer", "output_dir": "x", "data": {"photo_size": 0}})
