"""Foundation-model encoders, VA-VAE alignment, perceptual and Gram losses over tiny random HF backbones saved to
disk (no pretrained weights exist offline)."""

import json

import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tokenizer_bridge.nn.conv import ConvEncoder
from tokenizer_bridge.nn.foundation import (
    AlignmentLoss,
    FoundationAlignment,
    FoundationEncoder,
    VisionBackbone,
    adaptive_weight,
    alignment_loss,
    last_layer_weight,
)
from tokenizer_bridge.nn.losses import PerceptualLoss, gram_loss, gram_matrix

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
            image_size=32)
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def save(tmp_path_factory, name, model, processor=None):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(tmp_path_factory, "dinov2", Dinov2Model(Dinov2Config(**TINY)), dict(do_normalize=True, **IMAGENET))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(1)
    return save(tmp_path_factory, "siglip", SiglipVisionModel(SiglipVisionConfig(**TINY)))


@pytest.fixture(scope="module")
def registers_dir(tmp_path_factory):
    torch.manual_seed(2)
    return save(tmp_path_factory, "dinoreg", Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY)))


def images(n=2, h=32, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ backbone loading
def test_backbone_reads_normalisation_and_maps_minus_one_to_one(dinov2_dir, siglip_dir):
    dino = VisionBackbone.from_pretrained(dinov2_dir)
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    expected = (torch.tensor([0.0, 1.0]) - torch.tensor(IMAGENET["image_mean"])[:, None]) / \
        torch.tensor(IMAGENET["image_std"])[:, None]
    torch.testing.assert_close(dino.normalise(x)[0, :, 0], expected)
    siglip = VisionBackbone.from_pretrained(siglip_dir)  # no preprocessor_config.json: [-1, 1] passes through
    torch.testing.assert_close(siglip.normalise(x), x)


@pytest.mark.parametrize("fixture", ["dinov2_dir", "siglip_dir", "registers_dir"])
def test_feature_maps_drop_cls_and_register_tokens(fixture, request):
    backbone = VisionBackbone.from_pretrained(request.getfixturevalue(fixture))
    maps = backbone.feature_maps(images(h=32, w=48), [0, -1])
    assert [m.shape for m in maps] == [(2, 32, 8, 12)] * 2
    assert not backbone.training and not backbone.train().training  # always eval


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="LPIPS/VGG weights cannot be downloaded"):
        PerceptualLoss.from_pretrained(None)
    with pytest.raises(ValueError, match="does not exist.*LPIPS/VGG"):
        PerceptualLoss.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        PerceptualLoss.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="FoundationEncoder needs the weights"):
        FoundationEncoder.from_pretrained(None, latent_dim=8)


# ------------------------------------------------------------------------------------------------ perceptual + style
def test_perceptual_loss_zero_for_identical_positive_otherwise_with_input_gradient(dinov2_dir):
    loss_fn = PerceptualLoss.from_pretrained(dinov2_dir, layers=[1, 2])
    x, y = images(seed=0), images(seed=1)
    assert loss_fn(x, x.clone()).item() == 0.0
    rec = y.clone().requires_grad_(True)
    loss = loss_fn(rec, x)
    assert loss.item() > 0
    loss.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.backbone.parameters())
    # Closer images are closer in feature space.
    assert loss_fn(x + 0.05 * (y - x), x) < loss_fn(y, x)


def test_perceptual_loss_identical_after_reload(dinov2_dir):
    x, y = images(seed=0), images(seed=1)
    a = PerceptualLoss.from_pretrained(dinov2_dir)
    b = PerceptualLoss.from_pretrained(dinov2_dir)
    assert a.layers == [1, 2]  # default: every block
    assert torch.equal(a(x, y), b(x, y))


def test_learned_channel_weights_and_style_term(siglip_dir):
    x, y = images(seed=0), images(seed=1)
    uniform = PerceptualLoss.from_pretrained(siglip_dir, layers=[2])
    learned = PerceptualLoss.from_pretrained(siglip_dir, layers=[2], channel_weights="learned")
    assert [p.shape for p in learned.parameters() if p.requires_grad] == [(32,)]
    torch.testing.assert_close(learned(x, y), uniform(x, y))  # weights start at 1
    with torch.no_grad():
        learned.channel_weights[0][:16] = 0  # half the channels ignored -> smaller distance
    assert learned(x, y) < uniform(x, y)
    styled = PerceptualLoss.from_pretrained(siglip_dir, layers=[2], style_weight=10.0)
    feats = [styled.backbone.feature_maps(v, [2])[0] for v in (x, y)]
    torch.testing.assert_close(styled(x, y), uniform(x, y) + 10.0 * gram_loss(feats[:1], feats[1:]))


def test_gram_matrix_by_hand_and_blind_to_positions():
    f = torch.tensor([[1.0, 2.0], [0.0, 3.0]]).view(1, 2, 1, 2)  # channels (1, 2) and (0, 3) over 2 positions
    torch.testing.assert_close(gram_matrix(f), torch.tensor([[[2.5, 3.0], [3.0, 4.5]]]))
    a = torch.randn(2, 4, 3, 5)
    shuffled = a.flatten(2)[..., torch.randperm(15)].view_as(a)
    assert gram_loss([a], [shuffled]).item() < 1e-10
    assert gram_loss([a], [a * 2]).item() > 0


# ------------------------------------------------------------------------------------------------ foundation encoder
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_foundation_encoder_shapes_multi_layer(dinov2_dir, fusion):
    encoder = FoundationEncoder.from_pretrained(dinov2_dir, latent_dim=8, layers=[0, 1, -1], fusion=fusion)
    assert encoder(images(h=32, w=48)).shape == (2, 8, 8, 12)
    assert encoder(images(h=16, w=16)).shape == (2, 8, 4, 4)


def test_foundation_encoder_siglip_has_no_cls_to_drop(siglip_dir):
    encoder = FoundationEncoder.from_pretrained(siglip_dir, latent_dim=6, layers=[-2, -1])
    assert encoder(images(h=24, w=40)).shape == (2, 6, 6, 10)


def grads(module):
    return {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters()}


def test_frozen_and_trainable_layers(dinov2_dir):
    frozen = FoundationEncoder.from_pretrained(dinov2_dir, latent_dim=8, layers=[-1])
    frozen(images()).square().mean().backward()
    assert not any(v for n, v in grads(frozen).items() if n.startswith("backbone."))
    assert grads(frozen)["proj.weight"]

    partly = FoundationEncoder.from_pretrained(dinov2_dir, latent_dim=8, layers=[-1], trainable_layers=1)
    partly(images()).square().mean().backward()
    g = grads(partly)
    last = [n for n in g if n.startswith("backbone.model.encoder.layer.1.")]
    first = [n for n in g if n.startswith("backbone.model.encoder.layer.0.") or ".embeddings." in n]
    assert last and all(g[n] for n in last)
    assert first and not any(g[n] for n in first)
    assert all(p.requires_grad for n, p in partly.named_parameters() if n in last)
    with pytest.raises(ValueError, match="trainable_layers must be in"):
        FoundationEncoder.from_pretrained(dinov2_dir, latent_dim=8, trainable_layers=3)


# ------------------------------------------------------------------------------------------------ VA-VAE alignment
def identity_alignment(dim, **kw):
    align = AlignmentLoss(dim, dim, **kw)
    with torch.no_grad():
        align.proj.weight.copy_(torch.eye(dim))
        align.proj.bias.zero_()
    return align


def test_alignment_loss_zero_when_latents_equal_features_and_margins_forgive_small_deviations():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 4, 5)
    out = identity_alignment(16)(f.clone(), f)
    assert out.loss.item() == 0 and out.cosine_loss.item() == 0 and out.distance_loss.item() == 0
    noisy = f + 0.1 * torch.randn_like(f)
    assert identity_alignment(16)(noisy, f).loss.item() == 0  # inside the margins: free
    strict = identity_alignment(16, cosine_margin=0.0, distance_margin=0.0)(noisy, f)
    assert strict.cosine_loss > 0 and strict.distance_loss > 0
    far = identity_alignment(16)(torch.randn_like(f), f)
    assert far.cosine_loss > 0 and far.distance_loss > 0


def test_alignment_loss_values_by_hand():
    # Two positions; latents orthogonal to features at position 0, equal at position 1.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # f_0 = e0, f_1 = e1
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # z_0 = e1, z_1 = e1
    cos, dist = alignment_loss(z, f, cosine_margin=0.0, distance_margin=0.0)
    torch.testing.assert_close(cos, torch.tensor(0.5))  # (relu(1 - 0) + relu(1 - 1)) / 2
    torch.testing.assert_close(dist, torch.tensor(0.5))  # |1 - 0| on the two off-diagonal pairs, / 4
    cos, dist = alignment_loss(z, f, cosine_margin=0.25, distance_margin=0.5)
    torch.testing.assert_close(cos, torch.tensor(0.375))
    torch.testing.assert_close(dist, torch.tensor(0.25))


def test_foundation_alignment_with_conv_encoder_latents(dinov2_dir):
    torch.manual_seed(0)
    encoder = ConvEncoder(3, 8, [1, 1, 1], 1, latent_dim=6)  # f8 latents: 32x48 -> 4x6
    align = FoundationAlignment.from_pretrained(dinov2_dir, latent_dim=6, layer=-1)
    x = images(h=32, w=48)
    latents = encoder(x)
    assert align.features(x, latents.shape[-2:]).shape == (2, 32, 4, 6)  # teacher sees 16x24 px
    out = align(latents, x)
    assert out.loss > 0
    out.loss.backward()
    assert align.loss.proj.weight.grad is not None and encoder.stem.weight.grad is not None
    assert all(p.grad is None for p in align.teacher.parameters())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.ones(4, requires_grad=True)
    main, aux = (3 * w).sum(), (w**2).sum()  # gradients 3 and 2 per entry
    weight = adaptive_weight(main, aux, w, eps=0.0)
    torch.testing.assert_close(weight, torch.tensor(1.5))
    assert not weight.requires_grad
    (main + weight * aux).backward()  # the graph is kept
    torch.testing.assert_close(w.grad, torch.full((4,), 6.0))
    v = torch.ones(4, requires_grad=True)
    assert adaptive_weight((100 * v).sum(), (1e-3 * v).sum(), v, max_weight=50.0).item() == 50.0
    with pytest.raises(ValueError, match="auxiliary loss does not depend"):
        adaptive_weight((3 * v).sum(), (2 * w).sum(), v)
    with torch.no_grad():
        assert adaptive_weight((3 * v).sum(), (2 * v).sum(), v).item() == 1.0


def test_last_layer_weight_of_encoders(dinov2_dir):
    conv = ConvEncoder(3, 8, [1, 1], 1, latent_dim=6)
    assert last_layer_weight(conv) is conv.out[-1].weight
    foundation = FoundationEncoder.from_pretrained(dinov2_dir, latent_dim=8)
    assert last_layer_weight(foundation) is foundation.proj.weight


def test_backbone_from_config_then_pretrained_weights(dinov2_dir):
    # The path a tokenizer checkpoint takes: architecture from its config, weights copied in afterwards.
    ref = VisionBackbone.from_pretrained(dinov2_dir)
    built = VisionBackbone.from_config(ref.config.to_dict())
    x = images()
    assert not torch.equal(built.hidden_states(x)[-1], ref.hidden_states(x)[-1])
    built.load_pretrained_weights(dinov2_dir)
    assert torch.equal(built.hidden_states(x)[-1], ref.hidden_states(x)[-1])
    torch.testing.assert_close(built.image_std.flatten(), torch.tensor(IMAGENET["image_std"]))
