"""Image discriminators for adversarial tokenizer training: a PatchGAN and a StyleGAN-like residual network.

- :class:`PatchDiscriminator` is the PatchGAN of pix2pix (Isola et al. 2017) as VQGAN (Esser et al. 2021) uses it:
  ``num_layers`` stride-2 4x4 convolutions (widths ``base_channels * min(2**n, 8)``), one stride-1 4x4 conv and a
  4x4 conv to one logit per patch; LeakyReLU(0.2); weights N(0, 0.02), norm scales N(1, 0.02), as VQGAN initialises.
- :class:`StyleGANDiscriminator` follows the residual StyleGAN2 discriminator (Karras et al. 2020) that MAGVIT-v2
  (Yu et al. 2024) and Open-MAGVIT2 train against: residual blocks that blur (binomial [1, 3, 3, 1] filter) and
  halve the resolution, scaled by 1/sqrt(2), then a conv and two linear layers to one logit per image.

Both map ``pixel_values (B, 3, H, W)`` in [-1, 1] to logits ``(B, 1, h, w)`` (``h = w = 1`` for the StyleGAN one).
``DISCRIMINATORS`` is the one list of names; a discriminator section is ``{"type": name, **keyword arguments}``,
checked by :func:`check_discriminator_section` and built by :func:`build_discriminator`.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``(B, C, H, W)`` -> patch logits ``(B, 1, ~H / 2**num_layers, ~W / 2**num_layers)``.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv (VQGAN: 64).
        num_layers: stride-2 convolutions (VQGAN: 3; each one halves the resolution and, up to 8x, doubles the width).
        norm: ``"batch"`` (VQGAN), ``"group"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        if num_layers < 1 or base_channels < 1:
            raise ValueError(f"discriminator num_layers and base_channels must be >= 1, got {num_layers}, "
                             f"{base_channels}")
        widths = [base_channels * min(2**n, 8) for n in range(num_layers + 1)]
        layers = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=norm == "none"),
                       make_norm(norm, widths[n]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class BlurDown(nn.Module):
    """Binomial low-pass filter ([1, 3, 3, 1] outer product) then stride-2 subsampling, per channel (anti-aliased)."""

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)  # (1, 1, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2, groups=x.shape[1])


class ResidualDown(nn.Module):
    """conv3x3 -> LeakyReLU -> blur + halve -> conv3x3 -> LeakyReLU, plus a blurred, halved 1x1 skip; / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(in_ch, in_ch, 3, padding=1), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.down, self.skip = BlurDown(), nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.down(h)), 0.2)
        return (h + self.skip(self.down(x))) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
    """``(B, C, image_size, image_size)`` -> one logit per image ``(B, 1, 1, 1)``.

    Args:
        in_channels: image channels.
        image_size: the side it is trained at (the final linear layer sees ``(image_size / 2**levels)**2`` positions).
        base_channels: width of the stem; level ``i`` has ``base_channels * channel_mult[i]`` channels.
        channel_mult: one entry per residual down block (MAGVIT-v2: ``[2, 4, 4, 4, 4]`` at 256 px).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 256, base_channels: int = 64,
                 channel_mult: list[int] | tuple[int, ...] = (2, 4, 4, 4, 4)):
        super().__init__()
        side = image_size // 2 ** len(channel_mult)
        if side < 1 or image_size % 2 ** len(channel_mult):
            raise ValueError(f"the StyleGAN discriminator halves image_size={image_size} {len(channel_mult)} times: "
                             "it must be a multiple of 2**len(channel_mult)")
        self.image_size = image_size
        widths = [base_channels] + [base_channels * m for m in channel_mult]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualDown(a, b) for a, b in zip(widths, widths[1:])))
        self.out_conv = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)
        self.fc = nn.Linear(widths[-1] * side * side, widths[-1])
        self.logit = nn.Linear(widths[-1], 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the StyleGAN discriminator was built for {self.image_size} px images, got "
                             f"{tuple(pixel_values.shape[-2:])}")
        h = F.leaky_relu(self.stem(pixel_values), 0.2)
        h = F.leaky_relu(self.out_conv(self.blocks(h)), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.logit(h).view(-1, 1, 1, 1)


# the discriminator section's "type"
DISCRIMINATORS = {"patchgan": PatchDiscriminator, "stylegan": StyleGANDiscriminator}


def discriminator_parameters(kind: str) -> dict[str, inspect.Parameter]:
    if kind not in DISCRIMINATORS:
        raise ValueError(f"discriminator type must be one of {sorted(DISCRIMINATORS)}, got {kind!r}")
    return dict(list(inspect.signature(DISCRIMINATORS[kind].__init__).parameters.items())[1:])


def check_discriminator_section(section: dict) -> dict:
    """The section with every default filled in (what a checkpoint records), or a ``ValueError`` naming the unknown
    key, the missing type or a value the class refuses."""
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError(f'a discriminator section is a dict with a "type" (one of {sorted(DISCRIMINATORS)}), got '
                         f"{section!r}")
    params = discriminator_parameters(section["type"])
    unknown = sorted(set(section) - set(params) - {"type"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {section['type']!r} discriminator section; allowed (the "
                         f"keyword arguments of {DISCRIMINATORS[section['type']].__name__}): {sorted(params)}")
    full = {"type": section["type"]}
    for name, param in params.items():
        value = section.get(name, param.default)
        full[name] = list(value) if isinstance(value, tuple) else value
    with torch.device("meta"):  # the class's own checks, without allocating weights
        DISCRIMINATORS[full["type"]](**{k: v for k, v in full.items() if k != "type"})
    return full


def build_discriminator(section: dict) -> nn.Module:
    full = check_discriminator_section(section)
    return DISCRIMINATORS[full["type"]](**{k: v for k, v in full.items() if k != "type"})
