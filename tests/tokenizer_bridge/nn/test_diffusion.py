import pytest
import torch

from tokenizer_bridge.configuration_slot_tokenizer import SlotTokenizerConfig
from tokenizer_bridge.modeling_slot_tokenizer import SlotTokenizer
from tokenizer_bridge.nn.diffusion import DiffusionDecoder, timestep_embedding


def tiny_decoder(**kw):
    base = dict(cond_dim=8, cond_type="tokens", image_size=32, base_channels=8, channel_mult=(1, 2), num_heads=2,
                cond_dropout=0.0)
    base.update(kw)
    return DiffusionDecoder(**base)


def toy_images():
    """Four smooth 32x32 images in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    return torch.stack([torch.stack([xx * a, yy * a, (xx * yy).clamp(-1, 1)]) for a in (0.9, -0.7, 0.4, -0.2)])


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_timestep_embedding_shape_and_range():
    emb = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 16)
    assert emb.shape == (3, 16) and emb.abs().max() <= 1.0
    assert not torch.equal(emb[0], emb[2])


def test_flow_matching_loss_decreases_on_a_toy_set():
    torch.manual_seed(0)
    decoder = tiny_decoder()
    x, cond = toy_images(), torch.randn(4, 3, 8, generator=seeded(1))  # one token set per image

    def held_out_loss():  # 16 fixed (t, noise) draws: comparable before and after
        with torch.no_grad():
            return decoder.loss(x.repeat(4, 1, 1, 1), cond.repeat(4, 1, 1), generator=seeded(123)).item()

    before = held_out_loss()
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    for _ in range(50):
        loss = decoder.loss(x, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)


def test_sampler_is_deterministic_per_seed():
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    cond = torch.randn(2, 5, 8)
    a = decoder.sample(cond, steps=4, generator=seeded(0))
    b = decoder.sample(cond, steps=4, generator=seeded(0))
    c = decoder.sample(cond, steps=4, generator=seeded(1))
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_one_euler_step_is_noise_minus_velocity():
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    cond = torch.randn(1, 2, 8)
    noise = torch.randn(1, 3, 32, 32, generator=seeded(5))
    expected = noise - decoder(noise, torch.ones(1), cond)
    torch.testing.assert_close(decoder.sample(cond, steps=1, generator=seeded(5)), expected)


def test_map_condition_sets_the_output_size_and_trains():
    torch.manual_seed(0)
    decoder = tiny_decoder(cond_type="map", map_scale=8, cond_dropout=0.5).train()
    code_map = torch.randn(2, 8, 4, 4)  # grid ids looked up: (B, D, h, w)
    loss = decoder.loss(torch.rand(2, 3, 32, 32) * 2 - 1, code_map)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert decoder.sample(code_map, steps=2, generator=seeded(0)).shape == (2, 3, 32, 32)
    assert decoder.sample(torch.randn(1, 8, 2, 3), steps=1).shape == (1, 3, 16, 24)


def test_guidance_scale_one_is_plain_sampling_and_other_scales_differ():
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    cond = torch.randn(2, 3, 8)
    plain = decoder.sample(cond, steps=2, generator=seeded(0))
    assert torch.equal(plain, decoder.sample(cond, steps=2, generator=seeded(0), guidance_scale=1.0))
    assert not torch.allclose(plain, decoder.sample(cond, steps=2, generator=seeded(0), guidance_scale=3.0))


def test_bad_conditions_and_arguments_raise():
    decoder = tiny_decoder()
    with pytest.raises(ValueError, match="tokens"):
        decoder.sample(torch.randn(2, 8, 4, 4), steps=2)
    with pytest.raises(ValueError, match="steps"):
        decoder.sample(torch.randn(2, 3, 8), steps=0)
    with pytest.raises(ValueError, match="cond_type"):
        tiny_decoder(cond_type="text")
    with pytest.raises(ValueError, match="multiple"):
        decoder(torch.randn(1, 3, 31, 31), torch.ones(1), torch.randn(1, 2, 8))


def test_slot_tokenizer_decodes_ids_by_sampling_with_a_seed():
    torch.manual_seed(0)
    config = SlotTokenizerConfig(base_channels=8, backbone_dim=16, latent_dim=16, num_slots=8, slot_iters=1,
                                 num_heads=2, quantizer={"type": "vq", "codebook_size": 16, "num_levels": 2},
                                 decoder="diffusion", decoder_channels=8, decoder_channel_mult=[1, 2],
                                 diffusion_steps=3, image_size=32)
    model = SlotTokenizer(config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    assert out.reconstruction is None and torch.isfinite(out.loss) and out.decoder_loss is not None
    ids = model.encode(x)
    a = model.decode(ids, generator=seeded(0))
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, model.decode(ids, generator=seeded(0)))
    assert not torch.allclose(a, model.decode(ids, generator=seeded(1)))
    assert not torch.allclose(a, model.decode(ids, steps=5, generator=seeded(0)))
