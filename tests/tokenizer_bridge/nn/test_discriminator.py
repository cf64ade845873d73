"""Discriminators (PatchGAN, StyleGAN-like) and the adversarial loss: shapes, section checks, loss values on fixed
logits, LeCAM's anchors, R1 on a linear discriminator, the adaptive weight against a hand computation."""

import math

import pytest
import torch
from torch import nn

from tokenizer_bridge.nn import DISCRIMINATORS
from tokenizer_bridge.nn.adversarial import (
    AdversarialLoss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lecam_penalty,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
    non_saturating_image_generator_loss,
    r1_penalty,
)
from tokenizer_bridge.nn.discriminator import (
    PatchDiscriminator,
    StyleGANDiscriminator,
    build_discriminator,
    check_discriminator_section,
)


def test_patchgan_maps_256_px_to_vqgan_30x30_patches_for_every_norm():
    x = torch.randn(2, 3, 256, 256)
    for norm in ("batch", "group", "none"):
        d = PatchDiscriminator(base_channels=8, num_layers=3, norm=norm)
        assert d(x).shape == (2, 1, 30, 30)
    convs = [m for m in PatchDiscriminator(base_channels=8, num_layers=3).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]  # widths double, up to 8x
    assert [c.bias is None for c in convs] == [False, True, True, True, False]  # batch norm carries the bias
    assert PatchDiscriminator(base_channels=4, num_layers=5).layers[-1].in_channels == 32  # capped at 8x


def test_stylegan_discriminator_gives_one_logit_per_image_and_checks_its_size():
    d = StyleGANDiscriminator(image_size=32, base_channels=4, channel_mult=[1, 2, 2])
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="built for 32 px"):
        d(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 2"):
        StyleGANDiscriminator(image_size=20, channel_mult=[1, 2, 2])


def test_sections_are_checked_and_filled_with_defaults():
    assert set(DISCRIMINATORS) == {"patchgan", "stylegan"}
    full = check_discriminator_section({"type": "patchgan", "num_layers": 2})
    assert full == {"type": "patchgan", "in_channels": 3, "base_channels": 64, "num_layers": 2, "norm": "batch"}
    assert check_discriminator_section({"type": "stylegan"})["channel_mult"] == [2, 4, 4, 4, 4]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['width'\]"):
        check_discriminator_section({"type": "patchgan", "width": 3})
    with pytest.raises(ValueError, match="must be one of"):
        check_discriminator_section({"type": "biggan"})
    with pytest.raises(ValueError, match="norm must be one of"):
        check_discriminator_section({"type": "patchgan", "norm": "layer"})
    torch.manual_seed(0)
    a = build_discriminator({"type": "patchgan", "base_channels": 4})
    torch.manual_seed(0)
    b = build_discriminator(full | {"base_channels": 4, "num_layers": 3})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gan_losses_on_fixed_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) = [0, .5], relu(1 + fake) = [0, 1.5]; 1/2 (0.25 + 0.75)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)
    zero = torch.zeros(4)
    assert non_saturating_discriminator_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert non_saturating_generator_loss(zero).item() == pytest.approx(math.log(2))
    # a confident, correct discriminator: its loss goes to 0 and the generator's non-saturating loss grows
    assert non_saturating_discriminator_loss(torch.full((2,), 20.0), torch.full((2,), -20.0)).item() < 1e-8
    assert non_saturating_generator_loss(torch.full((2,), -20.0)).item() == pytest.approx(20.0, rel=1e-6)
    # Open-MAGVIT2's form: each image's patch logits are averaged before the softplus ([-2, 2] -> 0 -> log 2)
    patches = torch.tensor([[[[-2.0, 2.0]]], [[[-20.0, -20.0]]]])  # (B=2, 1, 1, 2)
    image = non_saturating_image_generator_loss(patches).item()
    assert image == pytest.approx((math.log(2) + 20.0) / 2, rel=1e-6)
    assert image != pytest.approx(non_saturating_generator_loss(patches).item(), rel=1e-3)


def test_the_generator_loss_can_differ_from_the_discriminators():
    torch.manual_seed(0)
    disc = build_discriminator({"type": "patchgan", "base_channels": 4, "num_layers": 1})
    x = torch.randn(2, 3, 16, 16)
    logits = disc(x).float()
    paired = AdversarialLoss(disc, loss="hinge", adaptive=False, weight=1.0, generator_loss="non_saturating_image")
    assert paired.generator_loss(x)[0].item() == pytest.approx(non_saturating_image_generator_loss(logits).item())
    plain = AdversarialLoss(disc, loss="hinge", adaptive=False, weight=1.0)
    assert plain.generator_loss(x)[0].item() == pytest.approx(hinge_generator_loss(logits).item())
    assert paired(x, x)[0].item() == pytest.approx(plain(x, x)[0].item())  # the discriminator's loss is the hinge's
    with pytest.raises(ValueError, match="generator_loss must be one of"):
        AdversarialLoss(disc, generator_loss="wgan")


class Constant(nn.Module):
    """A 'discriminator' whose logit of an image is its mean pixel (fixed logits for the loss module)."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True)


def test_lecam_anchors_are_emas_of_the_mean_logits_and_enter_the_penalty():
    assert lecam_penalty(torch.tensor([2.0]), torch.tensor([-2.0]), torch.tensor(1.0), torch.tensor(-1.0)).item() \
        == pytest.approx(9.0 + 9.0)  # relu(2 - (-1))^2 + relu(1 - (-2))^2
    assert lecam_penalty(torch.tensor([-3.0]), torch.tensor([3.0]), torch.tensor(1.0), torch.tensor(-1.0)) == 0
    loss = AdversarialLoss(Constant(), lecam_weight=0.5, lecam_decay=0.5)
    real, fake = torch.full((2, 3, 4, 4), 2.0), torch.full((2, 3, 4, 4), -2.0)
    total, metrics = loss(real, fake)
    assert (loss.anchor_real.item(), loss.anchor_fake.item()) == (1.0, -1.0)  # 0.5 * 0 + 0.5 * (+-2)
    assert metrics["lecam_loss"] == pytest.approx(18.0)
    assert total.item() == pytest.approx(0.5 * (0.0 + 0.0) + 0.5 * 18.0)  # hinge terms are 0 at +-2
    loss(real, fake)
    assert (loss.anchor_real.item(), loss.anchor_fake.item()) == (1.5, -1.5)
    assert set(dict(loss.named_buffers())) == {"anchor_real", "anchor_fake"}  # checkpointed with the weights


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight():
    d = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        d.weight.fill_(3.0)
    real = torch.randn(4, 1, 1, 1, requires_grad=True)
    penalty = r1_penalty(d(real), real)
    assert penalty.item() == pytest.approx(9.0)  # grad_x (w x) = w for every sample
    penalty.backward()
    assert d.weight.grad.item() == pytest.approx(6.0)  # d(w^2)/dw: the penalty trains the discriminator
    loss = AdversarialLoss(d, r1_weight=2.0)
    total, metrics = loss(torch.ones(2, 1, 1, 1), -torch.ones(2, 1, 1, 1))
    hinge = 0.5 * (max(0.0, 1 - 3.0) + max(0.0, 1 + -3.0))  # logits 3 (real) and -3 (fake)
    assert metrics["r1_penalty"] == pytest.approx(9.0)
    assert total.item() == pytest.approx(hinge + 0.5 * 2.0 * 9.0)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    target = torch.zeros(2, 2)
    reconstruction = (2 * w).view(1, 1, 2, 2)
    nll = (reconstruction.view(2, 2) - target).pow(2).mean()
    loss = AdversarialLoss(Constant(), loss="hinge", weight=0.1, adaptive=True)
    term, metrics = loss.generator_loss(reconstruction, nll, w)
    # by hand: nll = mean((2w)^2) -> grad 8w / 4 = 2w; g = -mean(2w) -> grad -2/4 = -0.5 everywhere
    grad_nll, grad_g = (2 * w.detach()).norm(), torch.full((2, 2), 0.5).norm()
    expected = 0.1 * grad_nll / (grad_g + 1e-4)
    assert metrics["adversarial_weight"] == pytest.approx(expected.item(), rel=1e-6)
    assert term.item() == pytest.approx((expected * -(2 * w.detach()).mean()).item(), rel=1e-6)
    term.backward()  # the weight is detached: only the generator term's gradient, scaled, reaches w
    torch.testing.assert_close(w.grad, torch.full((2, 2), -0.5) * expected)
    fixed, values = AdversarialLoss(Constant(), weight=0.1, adaptive=False).generator_loss(reconstruction.detach())
    assert values["adversarial_weight"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs nll_loss"):
        loss.generator_loss(reconstruction)
    with pytest.raises(ValueError, match="must be one of"):
        AdversarialLoss(Constant(), loss="wasserstein")
