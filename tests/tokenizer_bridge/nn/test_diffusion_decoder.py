"""Grid tokenizers with ``decoder="diffusion"``: shapes, seeded determinism, training, save/load, clear errors."""

import pytest
import torch
from transformers import AutoModel

from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.nn.diffusion import DiffusionDecoder

TINY_UNET = {"steps": 2, "base_channels": 8, "channel_mult": [1, 2]}
VQ16 = {"type": "vq", "codebook_size": 16}


def tiny_config(**kw):
    base = dict(base_channels=8, latent_dim=8, quantizer=VQ16, downsample=8, image_size=32, decoder="diffusion",
                decoder_options=dict(TINY_UNET))
    base.update(kw)
    return VisualTokenizerConfig(**base)


def images(n=2, height=32, width=32, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_images():
    """Four smooth 32x32 images in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    return torch.stack([torch.stack([xx * a, yy * a, (xx * yy).clamp(-1, 1)]) for a in (0.9, -0.7, 0.4, -0.2)])


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_decoder_is_a_map_conditioned_unet_with_the_options():
    model = VisualTokenizer(tiny_config())
    assert isinstance(model.decoder, DiffusionDecoder) and model.decoder.cond_type == "map"
    assert model.decoder.map_scale == 8 and model.decoder.stem.out_channels == 8
    settings = model.config.diffusion_settings()
    assert settings == dict(steps=2, sampler="euler", seed=0, base_channels=8, channel_mult=[1, 2],
                            cond_dropout=0.0, guidance_scale=1.0)
    defaults = VisualTokenizerConfig(base_channels=16, decoder="diffusion").diffusion_settings()
    assert defaults["base_channels"] == 16 and defaults["steps"] == 8 and defaults["channel_mult"] == [1, 2, 2]


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_encode_decode_shapes(height, width):
    model = VisualTokenizer(tiny_config()).eval()
    x = images(2, height, width)
    ids = model.encode(x)
    assert ids.shape == (2, height // 8, width // 8)
    out = model.decode(ids)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_residual_ids_decode():
    model = VisualTokenizer(tiny_config(quantizer={**VQ16, "num_levels": 2})).eval()
    ids = model.encode(images())
    assert ids.shape == (2, 4, 4, 2)
    assert model.decode(ids).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="image_ids must be"):
        model.decode(ids[..., 0])


def test_same_ids_and_seed_give_identical_pixels():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config()).eval()
    ids = model.encode(images())
    default = model.decode(ids)
    assert torch.equal(default, model.decode(ids))  # no generator: decoder_options["seed"] (0)
    assert torch.equal(default, model.decode(ids, generator=seeded(0)))
    assert torch.equal(model.decode(ids, generator=seeded(5)), model.decode(ids, generator=seeded(5)))
    assert not torch.allclose(default, model.decode(ids, generator=seeded(5)))
    assert not torch.allclose(default, model.decode(ids, steps=3))
    other_seed = VisualTokenizer(tiny_config(decoder_options={**TINY_UNET, "seed": 7})).eval()
    other_seed.load_state_dict(model.state_dict())
    assert torch.equal(other_seed.decode(ids), model.decode(ids, generator=seeded(7)))


def test_one_step_is_the_velocity_estimate_and_heun_differs():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config()).eval()
    ids = model.encode(images())
    codes = model.quantizer.lookup(ids)
    noise = torch.randn(2, 3, 32, 32, generator=seeded(0))
    with torch.no_grad():
        expected = noise - model.decoder(noise, torch.ones(2), codes)
    torch.testing.assert_close(model.decode(ids, steps=1), expected)
    heun = model.decode(ids, sampler="heun")
    assert heun.shape == (2, 3, 32, 32) and not torch.allclose(heun, model.decode(ids))
    torch.testing.assert_close(model.decode(ids, steps=1, sampler="heun"), expected)  # last step is plain Euler
    with pytest.raises(ValueError, match="sampler"):
        model.decode(ids, sampler="ddim")


def test_forward_trains_with_flow_matching_and_samples_in_eval():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config())
    x = images()
    out = model.train()(x)
    assert out.reconstruction is None and "psnr" not in out.metrics
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.reconstruction_loss > 0
    out.loss.backward()
    assert model.encoder.stem.weight.grad.abs().sum() > 0, "the flow loss trains the encoder through the codes"
    model.eval()
    out = model(x)
    assert out.reconstruction.shape == x.shape and "psnr" in out.metrics
    torch.testing.assert_close(out.reconstruction, model.decode(model.encode(x)))
    assert torch.equal(model(x, return_loss=False).reconstruction, out.reconstruction)


def test_flow_loss_decreases_over_a_few_steps_on_a_tiny_batch():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config(quantizer={**VQ16, "kmeans_init": False}))
    x = smooth_images()

    def fixed_noise_loss():  # 16 fixed (t, noise) draws: comparable before and after
        model.eval()
        with torch.no_grad():
            codes = model.quantizer(model.encode_latents(x)).quantized
            loss = model.decoder.loss(x.repeat(4, 1, 1, 1), codes.repeat(4, 1, 1, 1), generator=seeded(123)).item()
        model.train()
        return loss

    before = fixed_noise_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_noise_loss()
    assert after < 0.6 * before, (before, after)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config(decoder_options={**TINY_UNET, "sampler": "heun", "seed": 3}))
    model.train()(images(4))  # k-means init changes the codebook
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, VisualTokenizer) and isinstance(loaded.decoder, DiffusionDecoder)
    assert loaded.config.decoder_options == {**TINY_UNET, "sampler": "heun", "seed": 3}
    x = images(2, seed=1)
    ids = model.encode(x)
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert torch.equal(loaded.decode(ids, generator=seeded(9)), model.decode(ids, generator=seeded(9)))
    assert loaded.fingerprint() == model.fingerprint()


def test_classifier_free_guidance_option():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config(decoder_options={**TINY_UNET, "cond_dropout": 0.2,
                                                         "guidance_scale": 2.0})).eval()
    ids = model.encode(images())
    guided = model.decode(ids)
    assert not torch.allclose(guided, model.decode(ids, guidance_scale=1.0))


@pytest.mark.parametrize("kw,match", [
    (dict(decoder_options={"stepz": 4}), "unknown decoder_options"),
    (dict(decoder_options={"steps": 0}), "steps"),
    (dict(decoder_options={"steps": 2.5}), "steps"),
    (dict(decoder_options={"sampler": "ddim"}), "sampler"),
    (dict(decoder_options={"channel_mult": []}), "channel_mult"),
    (dict(decoder_options={"channel_mult": [1, 2, 2, 2, 2]}), "divide downsample=8"),
    (dict(decoder_options={"base_channels": 0}), "base_channels"),
    (dict(decoder_options={"cond_dropout": 1.0}), "cond_dropout"),
    (dict(decoder_options={"guidance_scale": 2.0}), "cond_dropout > 0"),
    (dict(decoder_options={"seed": "a"}), "seed"),
    (dict(decoder_options={}, perceptual_weight=0.1), "pixel decoder"),
    (dict(decoder="difusion"), "decoder must be one of"),
])
def test_bad_options_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_diffusion_settings_needs_a_diffusion_decoder():
    with pytest.raises(ValueError, match="decoder='diffusion'"):
        VisualTokenizerConfig(decoder="conv").diffusion_settings()


def test_tokenizer_stage_trains_a_diffusion_decoder(tmp_path):
    recipe = load_recipe("recipes/tokenizer_conv_vq.yaml", [
        f"output_dir={tmp_path}", "data.num_train=32", "train.batch_size=8", "train.steps=3", "train.save_every=0",
        "model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "model.decoder=diffusion",
        "model.decoder_options={steps: 2, base_channels: 8, channel_mult: [1, 2]}",
    ])
    path, history = run(recipe)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    loaded = VisualTokenizer.from_pretrained(path)
    assert isinstance(loaded.decoder, DiffusionDecoder)
    assert loaded.decode(loaded.encode(images())).shape == (2, 3, 32, 32)
