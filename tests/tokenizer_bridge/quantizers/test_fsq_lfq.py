import math

import pytest
import torch

from tokenizer_bridge.quantizers.fsq import (
    FiniteScalarQuantizer,
    code_usage_metrics,
    merge_ids,
    split_ids,
)
from tokenizer_bridge.quantizers.lfq import (
    LookupFreeQuantizer,
    batch_entropy,
    bit_logits,
    code_distribution,
    per_sample_entropy,
)

LEVELS = [8, 5, 4, 3, 2]


# ---------------------------------------------------------------------------------------------------------- FSQ
def test_fsq_values_lie_on_the_level_grid():
    fsq = FiniteScalarQuantizer(LEVELS)
    assert fsq.codebook_size == 8 * 5 * 4 * 3 * 2 and fsq.dim == 5
    out = fsq(torch.randn(4, 5, 6, 7) * 3)
    steps = out.quantized.permute(0, 2, 3, 1).reshape(-1, 5) * torch.tensor([L // 2 for L in LEVELS])
    assert torch.equal(steps, steps.round())
    for c, level in enumerate(LEVELS):
        assert steps[:, c].min() >= -(level // 2) and steps[:, c].max() <= level - 1 - level // 2
    assert out.image_ids.shape == (4, 6, 7) and out.image_ids.min() >= 0 and out.image_ids.max() < fsq.codebook_size
    assert float(out.loss) == 0.0


def test_fsq_lookup_reproduces_quantized_exactly():
    fsq = FiniteScalarQuantizer([8, 8, 8, 5, 5, 5])
    for latents in (torch.randn(2, 6, 5, 4) * 2, torch.randn(3, 9, 6)):
        out = fsq(latents)
        assert torch.equal(fsq.lookup(out.image_ids), out.quantized)


def test_fsq_ids_are_mixed_radix_with_channel_0_least_significant():
    fsq = FiniteScalarQuantizer([4, 3])
    codes = fsq.lookup(torch.arange(12))  # (12, 2)
    digits = torch.round(codes * torch.tensor([2.0, 1.0])) + torch.tensor([2.0, 1.0])
    assert torch.equal(digits[:, 0] + 4 * digits[:, 1], torch.arange(12).float())


def _latents_reaching_every_code(fsq: FiniteScalarQuantizer) -> torch.Tensor:
    """One latent per id, built channel by channel from a sweep (channels are independent)."""
    sweep = torch.linspace(-12, 12, 4001)
    per_channel = []
    for c, level in enumerate(fsq.levels):
        z = torch.zeros(len(sweep), len(fsq.levels))
        z[:, c] = sweep
        digit = torch.round(fsq.bound(z)[:, c]).long() + level // 2
        assert set(digit.tolist()) == set(range(level)), f"channel {c} does not reach every level"
        per_channel.append(torch.stack([sweep[digit == d][len(sweep[digit == d]) // 2] for d in range(level)]))
    digits = split_ids(torch.arange(fsq.codebook_size), fsq.levels)  # (K, C)
    return torch.stack([per_channel[c][digits[:, c]] for c in range(len(fsq.levels))], dim=1)


def test_fsq_every_code_is_reachable_and_ids_are_bijective():
    fsq = FiniteScalarQuantizer(LEVELS)
    latents = _latents_reaching_every_code(fsq).unsqueeze(0)  # (1, K, C)
    out = fsq(latents)
    assert torch.equal(out.image_ids[0], torch.arange(fsq.codebook_size))
    codes = fsq.lookup(torch.arange(fsq.codebook_size))
    assert torch.equal(out.quantized[0], codes)
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size


def test_fsq_zero_maps_to_zero_for_odd_and_even_levels():
    fsq = FiniteScalarQuantizer([3, 4, 7, 8])
    assert torch.equal(fsq.bound(torch.zeros(1, 4)), torch.zeros(1, 4))


def test_fsq_gradient_is_straight_through():
    fsq = FiniteScalarQuantizer(LEVELS)
    latents = torch.randn(2, 7, 5, requires_grad=True)
    weights = torch.randn(2, 7, 5)
    (fsq(latents).quantized * weights).sum().backward()
    reference = latents.detach().clone().requires_grad_(True)
    half_width = torch.tensor([L // 2 for L in LEVELS], dtype=torch.float32)
    (fsq.bound(reference.reshape(-1, 5)).reshape(2, 7, 5) / half_width * weights).sum().backward()
    torch.testing.assert_close(latents.grad, reference.grad)
    assert latents.grad.abs().sum() > 0


def test_fsq_projection_and_state_dict_round_trip():
    fsq = FiniteScalarQuantizer([8, 5, 5, 5], dim=16).eval()
    latents = torch.randn(2, 16, 4, 4)
    out = fsq(latents)
    assert out.quantized.shape == latents.shape and fsq.codebook_size == 1000
    torch.testing.assert_close(fsq.lookup(out.image_ids), out.quantized)
    clone = FiniteScalarQuantizer([8, 5, 5, 5], dim=16).eval()
    clone.load_state_dict(fsq.state_dict())
    again = clone(latents)
    assert torch.equal(again.image_ids, out.image_ids) and torch.equal(again.quantized, out.quantized)
    assert set(fsq.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}


def test_fsq_sub_tokens_follow_channel_groups():
    fsq = FiniteScalarQuantizer([8, 8, 8, 5, 5, 5])
    factors = fsq.sub_token_factors([3, 3])
    assert factors == [512, 125]
    out = fsq(torch.randn(2, 50, 6) * 2)
    sub = split_ids(out.image_ids, factors)  # (2, 50, 2)
    assert torch.equal(merge_ids(sub, factors), out.image_ids)
    first_three = FiniteScalarQuantizer([8, 8, 8])
    assert torch.equal(first_three.lookup(sub[..., 0]), out.quantized[..., :3])
    with pytest.raises(ValueError):
        fsq.sub_token_factors([3, 2])


def test_usage_metrics_for_huge_codebooks_match_dense_and_stay_small():
    ids = torch.tensor([0, 3, 3, 7, 7, 7])
    dense = code_usage_metrics(ids, 16)
    sparse = code_usage_metrics(ids, 1 << 40)
    assert math.isclose(dense["perplexity"], sparse["perplexity"], rel_tol=1e-6)
    assert sparse["codebook_usage"] == 3 / (1 << 40)
    fsq = FiniteScalarQuantizer([16] * 10)  # 2^40 codes: must not allocate per-code counters
    assert fsq(torch.randn(1, 8, 10)).image_ids.max() < fsq.codebook_size


def test_fsq_rejects_bad_inputs():
    fsq = FiniteScalarQuantizer(LEVELS)
    with pytest.raises(ValueError):
        fsq(torch.full((1, 3, 5), float("nan")))
    with pytest.raises(ValueError):
        fsq(torch.randn(1, 3, 4))
    with pytest.raises(ValueError):
        fsq.lookup(torch.tensor([fsq.codebook_size]))
    with pytest.raises(ValueError):
        FiniteScalarQuantizer([8, 1])


# ---------------------------------------------------------------------------------------------------------- LFQ
def dense_code_probs(x: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Brute force p(c|x) = softmax(-||x - c||^2 / T) over all 2^b codes in id order -> (N, 2^b)."""
    b = x.shape[1]
    ids = torch.arange(1 << b)
    codes = (((ids.unsqueeze(1) >> torch.arange(b)) & 1).to(x.dtype) * 2 - 1) * scale  # (K, b)
    return torch.softmax(-torch.cdist(x, codes).pow(2) / temperature, dim=1)


def dense_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_lfq_ids_are_bits_and_lookup_is_exact():
    lfq = LookupFreeQuantizer(bits=10).eval()
    latents = torch.randn(3, 10, 4, 5)
    out = lfq(latents)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 10)
    expected = ((flat > 0).long() << torch.arange(10)).sum(1)
    assert torch.equal(out.image_ids.reshape(-1), expected)
    assert set(out.quantized.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(lfq.lookup(out.image_ids), out.quantized)
    assert torch.equal(lfq.lookup(torch.tensor([[0b101]]))[0, 0, :3], torch.tensor([1.0, -1.0, 1.0]))


def test_bsq_codes_lie_on_the_unit_sphere():
    lfq = LookupFreeQuantizer(bits=9, spherical=True).eval()
    out = lfq(torch.randn(2, 11, 9))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(2, 11))
    assert torch.equal(lfq.lookup(out.image_ids), out.quantized)
    assert torch.equal(out.quantized.abs(), torch.full_like(out.quantized, 9**-0.5))


@pytest.mark.parametrize("spherical", [False, True])
def test_lfq_every_code_is_reachable(spherical):
    lfq = LookupFreeQuantizer(bits=6, spherical=spherical).eval()
    codes = lfq.lookup(torch.arange(64))
    out = lfq(codes.unsqueeze(0))
    assert torch.equal(out.image_ids[0], torch.arange(64)) and torch.equal(out.quantized[0], codes)


@pytest.mark.parametrize("spherical,temperature", [(False, 1.0), (False, 0.3), (True, 0.05)])
def test_per_sample_entropy_matches_brute_force(spherical, temperature):
    lfq = LookupFreeQuantizer(bits=6, spherical=spherical, temperature=temperature)
    x = lfq.prepare(torch.randn(40, 6)).double()
    logits = bit_logits(x, lfq.scale, temperature)
    expected = dense_entropy(dense_code_probs(x, lfq.scale, temperature))
    torch.testing.assert_close(per_sample_entropy(logits), expected)


@pytest.mark.parametrize("bits", [1, 6, 7])
def test_exact_code_distribution_and_batch_entropy_match_brute_force(bits):
    x = torch.randn(50, bits, dtype=torch.float64) * 0.7
    dense = dense_code_probs(x, 1.0, 2.0).mean(0)
    logits = bit_logits(x, 1.0, 2.0)
    torch.testing.assert_close(code_distribution(logits), dense)
    torch.testing.assert_close(batch_entropy(logits, "exact"), dense_entropy(dense))


@pytest.mark.parametrize("spherical", [False, True])
def test_entropy_loss_gradient_matches_brute_force(spherical):
    torch.manual_seed(0)
    lfq = LookupFreeQuantizer(
        bits=6, dim=10, spherical=spherical, commitment_weight=0.0, entropy_weight=0.5, diversity_weight=0.8,
        temperature=0.5 if not spherical else 0.1, entropy_mode="exact",
    ).double().train()
    latents = torch.randn(3, 12, 10, dtype=torch.float64, requires_grad=True)
    lfq(latents).loss.backward()
    reference = latents.detach().clone().requires_grad_(True)
    x = lfq.prepare(reference.reshape(-1, 10)).double()
    p = dense_code_probs(x, lfq.scale, lfq.temperature)
    dense_loss = 0.5 * (dense_entropy(p).mean() - 0.8 * dense_entropy(p.mean(0)))
    dense_loss.backward()
    assert latents.grad.abs().sum() > 0
    torch.testing.assert_close(latents.grad, reference.grad)


def test_factorized_batch_entropy_is_an_upper_bound():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(64, 8, generator=g) * 3 + torch.randn(8, generator=g)
        exact, factorized = batch_entropy(logits, "exact"), batch_entropy(logits, "factorized")
        assert factorized >= exact - 1e-5
    independent = torch.zeros(10, 8)  # all bits fair and independent: the bound is tight (8 ln 2)
    torch.testing.assert_close(batch_entropy(independent, "factorized"), batch_entropy(independent, "exact"))
    torch.testing.assert_close(batch_entropy(independent, "exact"), torch.tensor(8 * math.log(2)))


def test_lfq_18_bits_exact_entropy_runs_on_a_batch():
    lfq = LookupFreeQuantizer(bits=18, temperature=1.0).train()
    assert lfq.entropy_mode == "exact" and LookupFreeQuantizer(bits=19).entropy_mode == "factorized"
    latents = torch.randn(1, 256, 18, requires_grad=True)
    out = lfq(latents)
    out.loss.backward()
    assert torch.isfinite(latents.grad).all() and 0 < out.metrics["batch_entropy"] <= 18 * math.log(2)
    dist = code_distribution(bit_logits(latents.detach().reshape(-1, 18), 1.0, 1.0))
    assert dist.shape == (1 << 18,) and math.isclose(float(dist.sum()), 1.0, rel_tol=1e-4)


def test_lfq_eval_loss_is_commitment_only():
    lfq = LookupFreeQuantizer(bits=8, commitment_weight=0.25).eval()
    latents = torch.randn(2, 5, 8)
    out = lfq(latents)
    torch.testing.assert_close(out.loss, 0.25 * (latents - out.quantized).pow(2).mean())
    assert "batch_entropy" not in out.metrics


def test_lfq_sub_tokens_are_low_and_high_bits():
    lfq = LookupFreeQuantizer(bits=18)
    factors = lfq.sub_token_factors([9, 9])
    assert factors == [512, 512]
    ids = lfq(torch.randn(2, 30, 18)).image_ids
    sub = split_ids(ids, factors)
    assert torch.equal(sub[..., 0], ids & 511) and torch.equal(sub[..., 1], ids >> 9)
    assert torch.equal(merge_ids(sub, factors), ids)
    with pytest.raises(ValueError):
        split_ids(torch.tensor([1 << 18]), factors)
    with pytest.raises(ValueError):
        merge_ids(torch.tensor([[512, 0]]), factors)


def test_lfq_projection_and_state_dict_round_trip():
    lfq = LookupFreeQuantizer(bits=10, dim=32, spherical=True).eval()
    latents = torch.randn(2, 32, 3, 3)
    out = lfq(latents)
    assert out.quantized.shape == latents.shape and lfq.codebook_size == 1024
    torch.testing.assert_close(lfq.lookup(out.image_ids), out.quantized)
    clone = LookupFreeQuantizer(bits=10, dim=32, spherical=True).eval()
    clone.load_state_dict(lfq.state_dict())
    again = clone(latents)
    assert torch.equal(again.image_ids, out.image_ids) and torch.equal(again.quantized, out.quantized)


def test_lfq_gradient_is_straight_through():
    lfq = LookupFreeQuantizer(bits=8, commitment_weight=0.0).train()
    latents = torch.randn(2, 8, 3, 3, requires_grad=True)
    weights = torch.randn(2, 8, 3, 3)
    (lfq(latents).quantized * weights).sum().backward()
    torch.testing.assert_close(latents.grad, weights)


def test_lfq_rejects_bad_inputs():
    lfq = LookupFreeQuantizer(bits=6)
    with pytest.raises(ValueError):
        lfq(torch.tensor([[[float("inf")] * 6]]))
    with pytest.raises(ValueError):
        lfq(torch.randn(1, 2, 5))
    with pytest.raises(ValueError):
        lfq.lookup(torch.tensor([-1]))
    with pytest.raises(ValueError):
        lfq.lookup(torch.tensor([64]))
    with pytest.raises(ValueError):
        LookupFreeQuantizer(bits=6, entropy_mode="dense")
    with pytest.raises(ValueError):
        LookupFreeQuantizer(bits=6, temperature=0.0)
