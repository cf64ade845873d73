import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer_bridge.configuration_slot_tokenizer import SlotTokenizerConfig
from tokenizer_bridge.modeling_slot_tokenizer import SlotTokenizer
from tokenizer_bridge.nn.slots import (
    SlotAttention,
    SlotEncoder,
    draw_slot_masks,
    slot_colours,
)


def vq(codebook_size=32, num_levels=2, **options):
    return {"type": "vq", "codebook_size": codebook_size, "num_levels": num_levels, **options}


def tiny_config(**kw):
    base = dict(base_channels=8, backbone_dim=16, latent_dim=16, num_slots=64, slot_budgets=[16, 32, 64],
                slot_iters=2, num_heads=2, quantizer=vq(), decoder="broadcast",
                decoder_channels=8, decoder_channel_mult=[1, 2], diffusion_steps=3, image_size=32,
                quantizer_warmup_steps=0)
    base.update(kw)
    return SlotTokenizerConfig(**base)


def images(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------- slot attention
def test_masks_sum_to_one_over_slots_at_every_position():
    torch.manual_seed(0)
    encoder = SlotEncoder(feature_dim=8, dim=16, max_slots=6, iters=3, qformer_layers=1, num_heads=2)
    out = encoder(torch.randn(3, 8, 5, 7), num_slots=4)
    assert out.slots.shape == (3, 4, 16) and out.masks.shape == (3, 4, 5, 7)
    assert (out.masks >= 0).all()
    torch.testing.assert_close(out.masks.sum(dim=1), torch.ones(3, 5, 7))


def test_sequence_features_square_become_a_grid_others_stay_flat():
    torch.manual_seed(0)
    encoder = SlotEncoder(feature_dim=8, dim=16, max_slots=4, iters=1, qformer_layers=0)
    assert encoder(torch.randn(2, 16, 8)).masks.shape == (2, 4, 4, 4)  # 16 tokens = 4 x 4 grid
    assert encoder(torch.randn(2, 10, 8)).masks.shape == (2, 4, 10)


def test_slot_attention_is_permutation_equivariant_in_the_slots():
    torch.manual_seed(0)
    attention = SlotAttention(dim=16, iters=3).eval()
    inputs, slots = torch.randn(2, 20, 16), torch.randn(2, 5, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, attn = attention(inputs, slots)
    out_p, attn_p = attention(inputs, slots[:, perm])
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn_p, attn[:, perm], atol=1e-5, rtol=1e-5)


def test_identical_slots_split_every_pixel_evenly():
    torch.manual_seed(0)
    attention = SlotAttention(dim=16, iters=2)
    slots = torch.randn(1, 1, 16).expand(1, 3, 16)
    out, attn = attention(torch.randn(1, 12, 16), slots)
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 3))
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_slots_compete_each_wins_the_region_it_matches():
    attention = SlotAttention(dim=4, iters=1)
    with torch.no_grad():
        for layer in (attention.to_q, attention.to_k):
            layer.weight.copy_(torch.eye(4) * 3)
    a, b = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0, 1.0])
    inputs = torch.stack([a] * 6 + [b] * 10).unsqueeze(0)  # (1, 16, 4): region A = first 6 pixels
    _, attn = attention(inputs, torch.stack([a, b]).unsqueeze(0))
    assert (attn[0, 0, :6] > 0.99).all() and (attn[0, 1, 6:] > 0.99).all()


def test_encoder_queries_permute_with_the_slots():
    torch.manual_seed(0)
    encoder = SlotEncoder(feature_dim=8, dim=16, max_slots=4, iters=2, qformer_layers=1, num_heads=2).eval()
    features, perm = torch.randn(2, 8, 4, 4), torch.tensor([2, 0, 3, 1])
    out = encoder(features)
    with torch.no_grad():
        encoder.queries.copy_(encoder.queries[perm])
    out_p = encoder(features)
    torch.testing.assert_close(out_p.slots, out.slots[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.masks, out.masks[:, perm], atol=1e-5, rtol=1e-5)


def test_unused_queries_get_zero_gradient_not_none():
    encoder = SlotEncoder(feature_dim=8, dim=16, max_slots=8, iters=2, qformer_layers=1, num_heads=2)
    encoder(torch.randn(2, 8, 4, 4), num_slots=3).slots.sum().backward()
    grad = encoder.queries.grad
    assert grad is not None and grad[:3].abs().sum() > 0 and (grad[3:] == 0).all()


# ---------------------------------------------------------------------- tokenizer: budgets, ids, masks
def test_one_model_encodes_16_32_64_slots_and_decodes_each():
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config()).eval()
    x = images()
    for n in (16, 32, 64):
        ids, masks = model.encode(x, num_slots=n, return_masks=True)
        assert ids.shape == (2, n, 2) and ids.dtype == torch.long
        assert masks.shape == (2, n, 8, 8)
        assert model.decode(ids).shape == (2, 3, 32, 32)
    assert model.encode(x).shape == (2, 64, 2)  # default budget: every query
    with pytest.raises(ValueError, match="num_slots"):
        model.encode(x, num_slots=65)


@pytest.mark.parametrize("levels,shape", [(1, (2, 16)), (3, (2, 16, 3))])
def test_residual_ids_have_a_level_axis_and_lie_in_the_codebook(levels, shape):
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(quantizer=vq(num_levels=levels), num_slots=16, slot_budgets=None))
    model.train()(images())  # k-means init of every level
    ids = model.encode(images(seed=1))
    assert ids.shape == shape and model.num_levels == levels and model.codebook_size == 32
    assert ids.min() >= 0 and ids.max() < 32
    with pytest.raises(ValueError, match="image_ids must be"):
        model.decode(ids[..., 0] if levels > 1 else ids.unsqueeze(-1))


def test_training_draws_budgets_from_the_nested_set():
    model = SlotTokenizer(tiny_config(slot_budgets=[16, 64]))
    torch.manual_seed(0)
    assert {model.training_budget() for _ in range(30)} == {16, 64}
    assert model.eval().training_budget() == 64
    out = model.train()(images(), num_slots=16)
    assert out.image_ids.shape[1] == 16 and out.metrics["num_slots"] == 16.0


def test_quantizer_warmup_decodes_continuous_slots_then_quantizes(tmp_path):
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(num_slots=8, slot_budgets=None, quantizer_warmup_steps=2)).train()
    for _ in range(2):
        out = model(images())
        assert out.image_ids is None and out.metrics["quantizer_warmup"] == 1.0
        out.loss.backward()  # the codebook stays in the graph (zero gradient), as DDP needs
        assert model.quantizer.level_quantizer(0).codebook.grad is not None
    assert not bool(model.quantizer.level_quantizer(0).initialized)  # no k-means on untrained slots
    assert model.eval()(images()).image_ids.shape == (2, 8, 2)  # eval never counts as a training step
    out = model.train()(images())
    assert out.image_ids.shape == (2, 8, 2) and bool(model.quantizer.level_quantizer(0).initialized)
    model.save_pretrained(tmp_path)
    assert int(SlotTokenizer.from_pretrained(tmp_path).training_steps) == 3  # a resumed run does not warm up again


def test_forward_matches_encode_then_decode_in_eval():
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(num_slots=16, slot_budgets=None))
    model.train()(images())
    model.eval()
    out = model(images(seed=2), return_loss=False)
    ids = model.encode(images(seed=2))
    assert torch.equal(out.image_ids, ids) and out.loss is None
    torch.testing.assert_close(model.decode(ids), out.reconstruction)


def test_short_training_of_the_broadcast_tokenizer_lowers_loss():
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(num_slots=8, slot_budgets=[4, 8], quantizer=vq(16)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = torch.stack([torch.stack([xx * a, yy * a, xx * yy]) for a in (0.2, 0.5, 0.8, -0.6)])
    losses = []
    for _ in range(30):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.decoder_loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_config_validation():
    with pytest.raises(ValueError, match="slot_budgets"):
        tiny_config(slot_budgets=[16, 128])
    with pytest.raises(ValueError, match="decoder"):
        tiny_config(decoder="conv")
    with pytest.raises(ValueError, match="image_size"):
        tiny_config(image_size=30)
    assert tiny_config(slot_budgets=[64, 16, 16]).slot_budgets == [16, 64]


# ---------------------------------------------------------------------- drawing
def test_draw_slot_masks_colours_each_slots_pixels():
    image = torch.zeros(3, 8, 8)  # mid grey
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2], masks[1, :, 2:] = 1.0, 1.0  # slot 0: left half, slot 1: right half
    picture = draw_slot_masks(image, masks, scale=2, alpha=1.0)
    assert isinstance(picture, Image.Image) and picture.size == (3 * 8 * 2, 8 * 2)
    pixels = np.asarray(picture).astype(float) / 255
    colours = slot_colours(2)
    tinted = pixels[:, 2 * 16 :]  # third panel, alpha=1: pure slot colours
    np.testing.assert_allclose(tinted[4, 1], colours[0], atol=1 / 255)
    np.testing.assert_allclose(tinted[4, 14], colours[1], atol=1 / 255)
    np.testing.assert_allclose(pixels[0, 0], [0.5, 0.5, 0.5], atol=1 / 255)  # first panel: the image


def test_draw_slot_masks_from_a_model_accepts_pil(tmp_path):
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(num_slots=16, slot_budgets=None))
    x = images(1)
    _, masks = model.encode(x, return_masks=True)
    pil = Image.fromarray(((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    picture = draw_slot_masks(pil, masks[0])
    picture.save(tmp_path / "masks.png")
    assert picture.size == (3 * 32 * 4, 32 * 4)
    with pytest.raises(ValueError, match="masks"):
        draw_slot_masks(pil, masks)


# ---------------------------------------------------------------------- save / load, identity
@pytest.mark.parametrize("decoder", ["diffusion", "broadcast"])
def test_save_load_round_trip_identical_ids_and_seeded_decode(tmp_path, decoder):
    torch.manual_seed(0)
    model = SlotTokenizer(tiny_config(decoder=decoder, num_slots=16, slot_budgets=[8, 16],
                                      quantizer=vq(codebook_update="ema")))
    model.train()(images(4))  # k-means init + EMA buffers change state
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = SlotTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.slot_budgets == [8, 16] and loaded.config.model_type == "slot_tokenizer"
    x = images(seed=3)
    for n in (8, 16):
        ids = model.encode(x, num_slots=n)
        assert torch.equal(ids, loaded.encode(x, num_slots=n))
        a = model.decode(ids, generator=torch.Generator().manual_seed(7))
        b = loaded.decode(ids, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)
    assert model.fingerprint() == loaded.fingerprint()


def test_fingerprint_changes_with_weights():
    torch.manual_seed(0)
    a = SlotTokenizer(tiny_config(num_slots=4, slot_budgets=None))
    torch.manual_seed(0)
    b = SlotTokenizer(tiny_config(num_slots=4, slot_budgets=None))
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.slot_encoder.queries[0, 0] += 1
    assert a.fingerprint() != b.fingerprint()
