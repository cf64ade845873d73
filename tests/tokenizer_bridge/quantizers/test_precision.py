"""Mixed precision: under a bf16 autocast region (what accelerate's ``mixed_precision: bf16`` runs the forward in)
every quantizer picks the codes fp32 picks, its losses stay finite and float32, and the quantized vectors come back
in the latents' dtype; a quantizer whose weights were cast to bf16 runs in bf16."""

import pytest
import torch

from tokenizer_bridge.quantizers import build_quantizer, check_quantizer_section, section_defaults

SECTIONS = {
    "vq": {"type": "vq", "codebook_size": 4096, "kmeans_init": False},
    "ibq": {"type": "ibq", "codebook_size": 4096},
    "lfq": {"type": "lfq", "bits": 14},
    "fsq": {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]},
    "residual_vq": {"type": "vq", "codebook_size": 1024, "kmeans_init": False, "num_levels": 3},
}


def quantizer(name: str, dim: int):
    section = {**section_defaults(SECTIONS[name]["type"]), **SECTIONS[name]}
    check_quantizer_section(section)
    torch.manual_seed(0)
    return build_quantizer(section, dim).train()


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_bf16_autocast_picks_the_fp32_codes(name):
    dim = 6 if name == "fsq" else 14 if name == "lfq" else 32
    q = quantizer(name, dim)
    latents = torch.randn(4, dim, 16, 16)
    reference = q(latents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = latents.to(torch.bfloat16)  # what a bf16 encoder hands over
        out = q(half)
    assert out.quantized.dtype == torch.bfloat16
    # the codes of the bf16-rounded latents, computed in fp32: what fp32 arithmetic on those inputs picks
    expected = q(half.float()).image_ids
    assert torch.equal(out.image_ids, expected)
    assert torch.is_tensor(out.loss) and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert reference.image_ids.shape == out.image_ids.shape


@pytest.mark.parametrize("quantizer_type", ["vq", "ibq", "lfq"])
def test_a_visual_tokenizer_trains_under_bf16_autocast(quantizer_type):
    # before the guard, bf16 latents met the fp32 codebook in one matmul: "mat1 and mat2 must have the same dtype"
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    section = {"type": quantizer_type, **({"bits": 8} if quantizer_type == "lfq" else {"codebook_size": 256})}
    model = VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8 if quantizer_type == "lfq" else 16,
                                                  downsample=8, image_size=32, quantizer=section))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.image_ids.shape == (2, 4, 4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_quantizer_cast_to_bf16_runs_in_bf16():
    q = quantizer("vq", 32).to(torch.bfloat16)
    out = q(torch.randn(2, 32, 4, 4, dtype=torch.bfloat16))
    assert q.compute_dtype() == torch.bfloat16 and out.quantized.dtype == torch.bfloat16
