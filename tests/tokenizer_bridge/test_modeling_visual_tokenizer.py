import pytest
import torch
from transformers import AutoConfig, AutoModel

from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.configuration_visual_tokenizer import legacy_config_dict
from tokenizer_bridge.metrics import psnr

VQ32 = {"type": "vq", "codebook_size": 32}


def tiny_config(**kw):
    base = dict(base_channels=16, latent_dim=16, quantizer=VQ32, downsample=8, image_size=32)
    base.update(kw)
    return VisualTokenizerConfig(**base)


@pytest.mark.parametrize("downsample,size", [(8, 32), (16, 64)])
def test_shapes_for_downsample(downsample, size):
    model = VisualTokenizer(tiny_config(downsample=downsample)).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (2, size // downsample, size // downsample) and ids.dtype == torch.long
    assert model.decode(ids).shape == x.shape
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.image_ids.shape == ids.shape
    assert set(out.metrics) >= {"psnr", "perplexity", "codebook_usage"}
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_encode_then_decode_equals_forward_reconstruction():
    model = VisualTokenizer(tiny_config()).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(x, return_loss=False)
    torch.testing.assert_close(model.decode(model.encode(x)), out.reconstruction)


def test_save_load_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config(quantizer={**VQ32, "codebook_update": "ema"}))
    model.train()(torch.rand(4, 3, 32, 32) * 2 - 1)  # k-means init + EMA buffers change state
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, VisualTokenizer) and isinstance(AutoConfig.from_pretrained(tmp_path), VisualTokenizerConfig)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))
    assert model.fingerprint() == loaded.fingerprint()


def test_fingerprint_changes_with_weights_and_config():
    torch.manual_seed(0)
    a = VisualTokenizer(tiny_config())
    torch.manual_seed(0)
    b = VisualTokenizer(tiny_config())
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.quantizer.codebook[0, 0] += 1
    assert a.fingerprint() != b.fingerprint()


def test_short_training_lowers_loss():
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    # a few fixed smooth images: easy to reconstruct
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = torch.stack([torch.stack([xx * a, yy * a, xx * yy]) for a in (0.2, 0.5, 0.8, -0.6)])
    losses = []
    for _ in range(40):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_gradient_loss_adds_the_l1_of_neighbour_differences():
    from tokenizer_bridge.modeling_visual_tokenizer import gradient_loss

    target = torch.zeros(1, 1, 4, 4)
    flat_shift = torch.full((1, 1, 4, 4), 0.5)  # a constant offset has the target's (zero) gradients
    assert float(gradient_loss(flat_shift, target)) == 0.0
    step = torch.zeros(1, 1, 4, 4)
    step[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1, no vertical difference is
    torch.testing.assert_close(gradient_loss(step, target), torch.tensor((4 / 12 + 0.0) / 2))

    torch.manual_seed(0)
    plain = VisualTokenizer(tiny_config())
    weighted = VisualTokenizer(tiny_config(gradient_weight=0.5))
    weighted.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = plain(x), weighted(x)
    torch.testing.assert_close(b.reconstruction_loss,
                               a.reconstruction_loss + 0.5 * gradient_loss(a.reconstruction, x))
    torch.testing.assert_close(b.loss - b.reconstruction_loss, a.loss - a.reconstruction_loss)


def test_gradient_weight_is_checked():
    with pytest.raises(ValueError, match="gradient_weight must be >= 0"):
        tiny_config(gradient_weight=-1.0)
    with pytest.raises(ValueError, match="gradient_weight > 0 needs a pixel decoder"):
        tiny_config(decoder="diffusion", gradient_weight=1.0)
    config = tiny_config(gradient_weight=0.25)
    assert VisualTokenizerConfig.from_dict(config.to_dict()).gradient_weight == 0.25


def test_perceptual_slot_requires_a_module_then_uses_it():
    model = VisualTokenizer(tiny_config(perceptual_weight=0.5))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="no perceptual loss is attached"):
        model(x)
    model.set_perceptual_loss(lambda rec, tgt: (rec - tgt).abs().mean() * 0 + 2.0)
    out = model(x)
    assert out.perceptual_loss == 2.0
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.quantizer_loss + 1.0)


@pytest.mark.parametrize("shape,match", [((1, 1, 32, 32), "pixel_values must be"), ((1, 3, 30, 32), "not a multiple")])
def test_bad_pixel_values(shape, match):
    model = VisualTokenizer(tiny_config())
    with pytest.raises(ValueError, match=match):
        model.encode(torch.zeros(shape))


@pytest.mark.parametrize("kw,match", [({"downsample": 12}, "power of two"), ({"quantizer": {"type": "nope"}}, "quantizer"),
                                      ({"channel_mult": [1, 2]}, "channel_mult")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_psnr_values():
    x = torch.zeros(1, 3, 4, 4)
    y = x + 0.2  # mse 0.04 over range 2 -> 10*log10(4/0.04) = 20 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0]))


@pytest.mark.parametrize(
    "kw,codebook_size,ids_shape",
    [
        ({"quantizer": {"type": "fsq", "levels": [4, 4, 3]}}, 48, (2, 4, 4)),
        ({"quantizer": {"type": "lfq", "bits": 6}}, 64, (2, 4, 4)),
        ({"quantizer": {"type": "vq", "codebook_size": 8, "num_levels": 3}}, 8, (2, 4, 4, 3)),
        ({"quantizer": {"type": "ibq", "codebook_size": 24, "entropy_weight": 0.1}}, 24, (2, 4, 4)),
        ({"quantizer": {**VQ32, "lookup_dim": 4, "rotation_trick": True}}, 32, (2, 4, 4)),
        ({"quantizer": {"type": "fsq", "levels": [5, 5], "num_levels": 2}}, 25, (2, 4, 4, 2)),
    ],
)
def test_every_configured_quantizer_encodes_decodes_and_round_trips(tmp_path, kw, codebook_size, ids_shape):
    torch.manual_seed(0)
    model = VisualTokenizer(tiny_config(**kw))
    assert model.config.codebook_size == model.codebook_size == codebook_size
    model.train()(torch.rand(2, 3, 32, 32) * 2 - 1).loss.backward()
    model.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == ids_shape and int(ids.min()) >= 0 and int(ids.max()) < codebook_size
    torch.testing.assert_close(model.decode(ids), model(x, return_loss=False).reconstruction)
    model.save_pretrained(tmp_path)
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded.encode(x), ids) and loaded.fingerprint() == model.fingerprint()


def test_quantizer_options_are_required_where_the_size_comes_from_them():
    with pytest.raises(ValueError, match="levels"):
        tiny_config(quantizer={"type": "fsq"})
    with pytest.raises(ValueError, match="bits"):
        tiny_config(quantizer={"type": "lfq"})


def test_fingerprint_survives_a_config_written_before_a_field_existed(tmp_path):
    """A bundle saved by an older release (config.json lacking a newer, default-valued field) keeps its fingerprint."""
    import json

    model = VisualTokenizer(tiny_config())
    model.save_pretrained(tmp_path)
    config = legacy_config_dict(model.config)  # the flat config.json of releases before the quantizer section
    for newer_field in ("residual_levels", "quantizer_dropout", "shared_codebook"):
        config.pop(newer_field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert VisualTokenizer.from_pretrained(tmp_path).fingerprint() == model.fingerprint()


def test_attached_perceptual_network_is_not_saved_or_fingerprinted():
    model = VisualTokenizer(tiny_config(perceptual_weight=0.1))
    before = (set(model.state_dict()), model.fingerprint())
    model.set_perceptual_loss(torch.nn.Conv2d(3, 3, 1))
    assert (set(model.state_dict()), model.fingerprint()) == before


VIT = {"width": 32, "depth": 1, "num_heads": 2}


def test_vit_tokenizer_takes_any_aspect_ratio_and_round_trips(tmp_path):
    model = VisualTokenizer(tiny_config(encoder="vit", decoder="vit", encoder_options=VIT, decoder_options=VIT,
                                        quantizer={"type": "fsq", "levels": [5, 5, 5]})).eval()
    for h, w in ((32, 48), (24, 16)):
        x = torch.rand(1, 3, h, w) * 2 - 1
        ids = model.encode(x)
        assert ids.shape == (1, h // 8, w // 8) and model.decode(ids).shape == x.shape
    model.save_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    assert torch.equal(VisualTokenizer.from_pretrained(tmp_path).encode(x), model.encode(x))


def test_foundation_encoder_with_alignment_loss(tmp_path):
    from transformers import Dinov2Config

    from tokenizer_bridge.nn.foundation import FoundationAlignment, VisionBackbone

    backbone = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    config = tiny_config(encoder="foundation", encoder_options={"config": Dinov2Config(**backbone).to_dict(),
                                                                "layers": [-2, -1]}, alignment_weight=0.1)
    model = VisualTokenizer(config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="no alignment module"):
        model(x)
    teacher = VisionBackbone.from_config(Dinov2Config(**backbone).to_dict())
    model.set_alignment(FoundationAlignment(teacher, config.latent_dim))
    out = model(x)
    assert out.alignment_loss is not None and out.alignment_loss > 0
    out.loss.backward()
    frozen = [p for p in model.encoder.backbone.parameters()]
    assert all(p.grad is None for p in frozen), "the backbone is frozen by default"
    assert model.encoder.proj.weight.grad is not None and model.encoder.proj.weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded.encode(x), model.encode(x))
    with pytest.raises(ValueError, match="foundation"):
        tiny_config(encoder="foundation")
