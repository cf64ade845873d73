"""A new decoder for a trained tokenizer's ids: ``init_from`` (start from a saved tokenizer, config keys updated) with
``train.freeze`` (encoder and quantizer fixed: same image ids), and the tile -> overlapping-footprint head conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm.training.freeze import freeze_modules
from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from mllm.training.stages.tokenizer import build_tokenizer_model, tokenizer_from
from tokenizer_bridge import VisualTokenizer
from tokenizer_bridge.nn.vit import ViTDecoder, tiles_to_footprints

CONV_VQ = ["model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "data.num_train=48",
           "train.batch_size=8", "train.save_every=0", "train.warmup_steps=0", "train.log_every=1"]
VIT_FSQ = ["model.encoder_options.width=16", "model.decoder_options.width=16", "model.latent_dim=8",
           "data.num_train=48", "train.batch_size=8", "train.save_every=0", "train.warmup_steps=0"]


def images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_flat_tiles_become_the_bilinear_blend_of_the_token_colours():
    p, c = 4, 3
    tiles = ViTDecoder(c, latent_dim=8, width=16, depth=1, num_heads=2, patch_size=p)
    blend = ViTDecoder(c, latent_dim=8, width=16, depth=1, num_heads=2, patch_size=p, overlap=True)
    with torch.no_grad():  # every pixel of a tile gets its channel's value: the tile decoder paints flat tiles
        rows = torch.randn(c, 16)
        tiles.out.weight.copy_(rows.repeat_interleave(p * p, 0))
        tiles.out.bias.copy_(torch.randn(c).repeat_interleave(p * p))
    trunk = {k: v for k, v in tiles.state_dict().items() if not k.startswith("out.")}
    blend.load_state_dict({**trunk, "out.weight": tiles_to_footprints(tiles.out.weight, p, c),
                           "out.bias": tiles_to_footprints(tiles.out.bias, p, c)})
    latents = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        flat, blended = tiles(latents), blend(latents)
    colours = flat[:, :, ::p, ::p]  # one colour per token
    assert torch.equal(flat, colours.repeat_interleave(p, 2).repeat_interleave(p, 3))
    expected = F.interpolate(colours, scale_factor=p, mode="bilinear", align_corners=False)
    assert blended.shape == (2, c, 12, 20)
    torch.testing.assert_close(blended, expected, atol=1e-5, rtol=1e-5)


def test_tiles_to_footprints_extends_each_tile_by_its_edge_pixels():
    p = 2
    bias = torch.arange(3 * p * p, dtype=torch.float32)  # channel 0: [[0, 1], [2, 3]]
    out = tiles_to_footprints(bias, p, 3).view(3, 2 * p, 2 * p)
    assert out[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert torch.equal(out[2], out[0] + 8)
    with pytest.raises(ValueError, match="12 rows"):
        tiles_to_footprints(torch.zeros(10), p, 3)


def test_a_frozen_encoder_and_ema_codebook_keep_the_ids_while_the_decoder_trains(tmp_path):
    first, _ = run(load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path / 'a'}", *CONV_VQ,
                                                                   "train.steps=4"]))
    before = VisualTokenizer.from_pretrained(first).eval()
    # eval_every: the held-out evaluation switches the model to eval and back; the frozen modules stay in eval mode
    second, history = run(load_recipe("recipes/tokenizer_conv_vq.yaml", [
        f"output_dir={tmp_path / 'b'}", *CONV_VQ, "train.steps=6", f"init_from={first}", "train.eval_every=3",
        "train.freeze=[encoder, quantizer]"]))
    after = VisualTokenizer.from_pretrained(second).eval()
    for prefix in ("encoder.", "quantizer."):  # the EMA codebook, its usage counts and restarts included
        old, new = state(before, prefix), state(after, prefix)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), prefix
    old, new = state(before, "decoder."), state(after, "decoder.")
    assert any(not torch.equal(old[k], new[k]) for k in old)  # the decoder did train
    with torch.no_grad():
        assert torch.equal(before.encode(images()), after.encode(images()))
    assert len(history) == 6 and "eval_psnr" in history[-1]


def test_a_tile_vit_tokenizer_gets_an_overlapping_decoder_with_the_same_ids(tmp_path):
    first, _ = run(load_recipe("recipes/demo_tokenizer.yaml", [f"output_dir={tmp_path / 'a'}", *VIT_FSQ,
                                                                "train.steps=3"]))
    # the demo's second stage: `decoder_options: {overlap: true}` and an L2 loss, every other decoder setting kept
    recipe = load_recipe("recipes/demo_decoder.yaml", [f"output_dir={tmp_path / 'b'}", f"init_from={first}",
                                                       "data.num_train=48", "train.batch_size=8", "train.steps=3",
                                                       "train.save_every=0", "train.warmup_steps=0"])
    model, fresh = tokenizer_from(recipe.init_from, recipe.model, recipe.data.image_size)
    # every tensor but those of the two blocks the stage adds (depth 2 -> 4) comes from the saved tokenizer, the
    # output layer converted
    assert fresh and {name.rsplit(".blocks.", 1)[1].split(".")[0] for name in fresh} == {"2", "3"}
    before = VisualTokenizer.from_pretrained(first).eval()
    assert before.config.decoder_options["depth"] == 2
    assert model.config.decoder_options == {**before.config.decoder_options, "overlap": True, "depth": 4}
    assert model.decoder.out.weight.shape[0] == 4 * before.decoder.out.weight.shape[0]
    second, _ = run(recipe)
    after = VisualTokenizer.from_pretrained(second).eval()
    assert after.config.decoder_options["overlap"] is True and after.config.decoder_options["width"] == 16
    assert (before.config.reconstruction_loss, after.config.reconstruction_loss) == ("l1+l2", "l2")
    x = images(size=48)  # a size neither stage trained at
    with torch.no_grad():
        ids = before.encode(x)
        assert torch.equal(ids, after.encode(x))
        assert after.decode(ids).shape == x.shape


def test_init_from_reports_the_tensors_that_no_longer_fit(tmp_path):
    first, _ = run(load_recipe("recipes/demo_tokenizer.yaml", [f"output_dir={tmp_path / 'a'}", *VIT_FSQ,
                                                                "train.steps=1"]))
    model, fresh = tokenizer_from(first, {"decoder_options": {"width": 24}}, 32)
    assert model.config.decoder_options["width"] == 24 and model.config.decoder_options["depth"] == 2
    assert fresh and all(name.startswith("decoder.") for name in fresh)
    saved = VisualTokenizer.from_pretrained(first)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in state(model, "encoder.").items())
    with pytest.raises(ValueError, match="holds a 'visual_tokenizer' tokenizer"):
        tokenizer_from(first, {"model_type": "slot_tokenizer"}, 32)
    with pytest.raises(ValueError, match="not a saved tokenizer"):
        tokenizer_from(str(tmp_path / "nothing"), {}, 32)


def test_a_deeper_decoder_grows_from_the_saved_one_with_identity_blocks(tmp_path):
    first, _ = run(load_recipe("recipes/demo_tokenizer.yaml", [f"output_dir={tmp_path / 'a'}", *VIT_FSQ,
                                                                "model.decoder_options.depth=2", "train.steps=2"]))
    saved = VisualTokenizer.from_pretrained(first).eval()
    model, fresh = tokenizer_from(first, {"decoder_options": {"depth": 4, "overlap": True}}, 32)
    model.eval()
    added = {name.split(".")[3] for name in fresh}
    assert added == {"2", "3"} and all(name.startswith("decoder.stack.blocks.") for name in fresh)
    for block in (2, 3):  # zero residual outputs; the rest of each block keeps its initialisation
        blk = model.decoder.stack.blocks[block]
        assert blk.attn.proj.weight.abs().max() == 0 and blk.mlp[2].bias.abs().max() == 0
        assert blk.attn.qkv.weight.abs().max() > 0
    x = images(size=48)
    with torch.no_grad():
        ids = saved.encode(x)
        assert torch.equal(model.encode(x), ids)
        grown, two = model.decode(ids), tokenizer_from(first, {"decoder_options": {"overlap": True}}, 32)[0].eval()
        torch.testing.assert_close(grown, two.decode(ids))  # the grown decoder starts as the saved depth-2 one
    wider, fresh = tokenizer_from(first, {"decoder_options": {"width": 24}}, 32)  # every block re-initialised
    assert all(blk.attn.proj.weight.abs().max() > 0 for blk in wider.decoder.stack.blocks)


def test_freeze_and_init_from_errors(tmp_path):
    tiny = load_recipe("recipes/demo_tokenizer.yaml", ["output_dir=x", *VIT_FSQ])
    vt = build_tokenizer_model(tiny.model, 32)
    with pytest.raises(ValueError, match="no module 'encoderr'.*'encoder', 'quantizer', 'decoder'"):
        freeze_modules(vt, ["encoderr"])
    with pytest.raises(ValueError, match="leaves no parameter"):
        freeze_modules(vt, ["encoder", "quantizer", "decoder"])
    with pytest.raises(ValueError, match="list of module names"):
        freeze_modules(vt, "encoder")
    assert all(p.requires_grad for p in vt.parameters())  # a refused freeze changed nothing
    frozen = freeze_modules(vt, ["encoder.stack"])
    assert frozen == [vt.encoder.stack] and not any(p.requires_grad for p in vt.encoder.stack.parameters())
    assert all(p.requires_grad for p in vt.encoder.out.parameters())
    with pytest.raises(ValueError, match="`init_from`.*tokenizer stage"):
        load_recipe("recipes/demo_llm.yaml", ["output_dir=x", f"init_from={tmp_path}"])
