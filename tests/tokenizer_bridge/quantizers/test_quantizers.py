import pytest
import torch

from tokenizer_bridge.quantizers import (
    QUANTIZERS,
    VectorQuantizer,
    kmeans,
    nearest_codes,
)


def brute_force(x, codebook):
    return torch.cdist(x.double(), codebook.double()).argmin(dim=1)


@pytest.mark.parametrize("m,k,d,tile", [(1000, 300, 8, 4096), (37, 1000, 16, 256 * 3), (500, 64, 32, 1 << 22), (1, 5, 3, 1)])
def test_chunked_nearest_codes_equal_brute_force(m, k, d, tile):
    g = torch.Generator().manual_seed(m + k)
    x, codebook = torch.randn(m, d, generator=g), torch.randn(k, d, generator=g)
    ids, dist = nearest_codes(x, codebook, tile_elements=tile)
    assert torch.equal(ids, brute_force(x, codebook))
    expected = (x - codebook[ids]).pow(2).sum(1)
    torch.testing.assert_close(dist, expected, rtol=1e-4, atol=1e-4)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(2048, 16, generator=g), torch.randn(512, 16, generator=g)
    small, _ = nearest_codes(x, codebook, tile_elements=1000)
    big, _ = nearest_codes(x, codebook, tile_elements=1 << 30)
    assert torch.equal(small, big)


def test_vq_ids_are_nearest_and_lookup_reproduces_quantized():
    vq = VectorQuantizer(dim=8, codebook_size=50, kmeans_init=False).eval()
    latents = torch.randn(3, 8, 5, 6)
    out = vq(latents)
    assert out.image_ids.shape == (3, 5, 6) and out.quantized.shape == latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(out.image_ids.reshape(-1), brute_force(flat, vq.codebook.detach()))
    torch.testing.assert_close(vq.lookup(out.image_ids), out.quantized)


def test_vq_sequence_latents():
    vq = VectorQuantizer(dim=4, codebook_size=10, kmeans_init=False).eval()
    out = vq(torch.randn(2, 7, 4))
    assert out.image_ids.shape == (2, 7) and out.quantized.shape == (2, 7, 4)
    torch.testing.assert_close(vq.lookup(out.image_ids), out.quantized)


def test_cosine_distance_uses_normalised_vectors():
    vq = VectorQuantizer(dim=6, codebook_size=20, distance="cosine", kmeans_init=False).eval()
    x = torch.randn(4, 9, 6)
    out = vq(x)
    sims = torch.nn.functional.normalize(x.reshape(-1, 6), dim=-1) @ vq.codes().t()
    assert torch.equal(out.image_ids.reshape(-1), sims.argmax(1))
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(4, 9), atol=1e-5)


def test_gradients_reach_latents_and_codebook():
    vq = VectorQuantizer(dim=8, codebook_size=16, kmeans_init=False).train()
    latents = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = vq(latents)
    (out.quantized.square().sum() + out.loss).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_kmeans_init_on_first_training_batch():
    torch.manual_seed(0)
    centres = torch.randn(4, 2) * 10
    data = (centres.repeat_interleave(100, 0) + 0.01 * torch.randn(400, 2)).view(1, 400, 2)
    vq = VectorQuantizer(dim=2, codebook_size=4, kmeans_init=True, kmeans_iters=20).train()
    assert not bool(vq.initialized)
    out = vq(data)
    assert bool(vq.initialized)
    # every true centre is matched by a code, and the commitment error is tiny
    dists = torch.cdist(centres, vq.codebook.detach()).min(1).values
    assert (dists < 0.1).all(), dists
    assert out.loss < 1e-3


def test_kmeans_function_recovers_clusters():
    torch.manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2)
    found = kmeans(x, 3, iters=25)
    assert torch.cdist(centres, found).min(1).values.max() < 0.2


def test_ema_codebook_moves_toward_assigned_latents_without_gradient():
    vq = VectorQuantizer(dim=2, codebook_size=2, codebook_update="ema", ema_decay=0.5, kmeans_init=False).train()
    assert not vq.codebook.requires_grad
    target = torch.tensor([3.0, -2.0])
    x = target.expand(1, 64, 2).clone()
    for _ in range(30):
        out = vq(x)
    used = int(out.image_ids[0, 0])
    torch.testing.assert_close(vq.codebook[used], target, atol=1e-3, rtol=0)


def test_dead_codes_are_restarted_from_batch_latents():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=8, kmeans_init=False, dead_code_threshold=0.5, ema_decay=0.5).train()
    vq.codebook.data[:] = torch.tensor([100.0, 100.0])  # all codes far away
    vq.codebook.data[0] = torch.zeros(2)  # only code 0 is ever picked
    x = torch.randn(1, 256, 2)
    for _ in range(6):  # usage of the never-picked codes: 0.9^6 = 0.53, still above the threshold
        vq(x)
    assert (vq.codebook.detach()[1:] == 100).all(), "restarted too early"
    vq(x)  # 0.9^7 = 0.48 < 0.5
    assert (vq.codebook.detach().abs() < 50).all(), "dead codes should be re-seeded near the data"


def test_dead_code_restart_does_not_wait_for_the_slow_codebook_ema():
    """The restart's usage average has its own short window: with the default ``ema_decay`` (0.99) and threshold
    0.02, codes nobody picks are restarted after ~38 steps (0.9^38 < 0.02), not after ~390 (0.99^390)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=8, kmeans_init=False, dead_code_threshold=0.02).train()
    vq.codebook.data[:] = torch.tensor([100.0, 100.0])
    vq.codebook.data[0] = torch.zeros(2)
    x = torch.randn(1, 64, 2)
    for step in range(1, 60):
        vq(x)
        if (vq.codebook.detach()[1:] != 100).any():
            break
    assert step == 38, step
    usage = vq.usage.clone()
    vq(x)  # restarted codes get a grace period instead of being restarted again at once
    assert ((vq.usage[1:] > 0.02) | (usage[1:] > 0.02)).all()


@pytest.mark.parametrize(
    "latents,match",
    [
        (torch.full((1, 8, 2, 2), float("nan")), "NaN or Inf"),
        (torch.randn(1, 5, 2, 2), "dimension 5"),
        (torch.randn(8), "must be"),
    ],
)
def test_bad_latents_raise_clear_errors(latents, match):
    vq = VectorQuantizer(dim=8, codebook_size=4, kmeans_init=False)
    with pytest.raises(ValueError, match=match):
        vq(latents)


def test_lookup_rejects_out_of_range_ids():
    vq = VectorQuantizer(dim=8, codebook_size=4, kmeans_init=False)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        vq.lookup(torch.tensor([[[0, 4]]]))
    with pytest.raises(TypeError):
        vq.lookup(torch.zeros(1, 2, 2))


def test_quantizer_registry_names_classes():
    assert QUANTIZERS["vq"] is VectorQuantizer
    with pytest.raises(ValueError, match="distance"):
        VectorQuantizer(dim=2, codebook_size=2, distance="manhattan")
