import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizer_bridge.quantizers.base import nearest_codes, tile_shape
from tokenizer_bridge.quantizers.ibq import IndexBackpropQuantizer
from tokenizer_bridge.quantizers.vq import VectorQuantizer, rotate_onto


# ---------------------------------------------------------------------------------------------- nearest_codes
@pytest.mark.parametrize("m,k,d,tile", [(300, 5000, 8, 1 << 20), (70, 1000, 4, 128 * 130), (5, 129, 3, 1 << 22)])
def test_blocked_tile_minimum_equals_brute_force(m, k, d, tile):
    g = torch.Generator().manual_seed(k)
    x, codebook = torch.randn(m, d, generator=g), torch.randn(k, d, generator=g)
    ids, _ = nearest_codes(x, codebook, tile_elements=tile)
    assert torch.equal(ids, torch.cdist(x.double(), codebook.double()).argmin(1))


@pytest.mark.parametrize("tile", [512 * 2048, 512])  # one tile per row / tiles of 512 codes
def test_ties_resolve_to_lowest_index_across_blocks_and_tiles(tile):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(4100, 4, generator=g) * 10 + 100  # far from the data
    x = torch.randn(64, 4, generator=g)
    target = x[:8].clone()
    for pos in (4099, 3000, 2050, 200, 130):  # same code repeated in later blocks, tiles and the ragged tail
        codebook[pos] = target[0]
    codebook[131] = target[1]
    codebook[4097] = target[1]
    ids, dist = nearest_codes(target[:2], codebook, tile_elements=tile)
    assert ids.tolist() == [130, 131]
    assert dist.abs().max() < 1e-4


def test_tile_shape_respects_memory_budget():
    for m, k, budget in [(4096, 65536, 1 << 22), (37, 1000, 768), (1, 5, 1), (10, 10**6, 1 << 16)]:
        rows, codes = tile_shape(m, k, budget)
        assert 1 <= rows <= m and 1 <= codes <= k and rows * codes <= max(budget, 1)


# ---------------------------------------------------------------------------------------------- IBQ
def dense_ibq(quantizer, x):
    """Unchunked reference: the full N x K softmax, plain autograd."""
    codebook = quantizer.codebook
    logits = x @ codebook.t()  # (N, K)
    soft = torch.softmax(logits / quantizer.temperature, dim=1)
    ids = logits.argmax(1)
    hard = F.one_hot(ids, quantizer.codebook_size).to(x.dtype)
    quantized = (hard - soft.detach() + soft) @ codebook
    q = codebook[ids]
    loss = quantizer.commitment_weight * F.mse_loss(x, q.detach())
    loss = loss + quantizer.codebook_weight * F.mse_loss(q, x.detach())
    loss = loss + quantizer.double_quant_weight * F.mse_loss(quantized, x)
    if quantizer.entropy_weight:
        log_p = torch.log_softmax(logits / quantizer.entropy_temperature, dim=1)
        sample = -(log_p.exp() * log_p).sum(1).mean()
        avg = log_p.exp().mean(0)
        batch = -(avg * avg.clamp_min(1e-12).log()).sum()
        loss = loss + quantizer.entropy_weight * (sample - batch)
    return quantized, ids, loss


@pytest.mark.parametrize("entropy_weight,entropy_temperature", [(0.0, 0.01), (0.5, 0.3), (0.5, 0.01)])
def test_chunked_ibq_equals_dense_reference(entropy_weight, entropy_temperature):
    torch.manual_seed(0)
    n, k, d = 37, 23, 5
    ibq = IndexBackpropQuantizer(
        d, k, temperature=0.7, entropy_weight=entropy_weight, entropy_temperature=entropy_temperature,
        tile_elements=4 * k,
    ).double()
    assert ibq.chunk_size == 4  # 10 chunks, the last one ragged
    x = torch.randn(n, d, dtype=torch.double, requires_grad=True)
    weights = torch.randn(n, d, dtype=torch.double)

    out = ibq(x.view(1, n, d))
    ((out.quantized.view(n, d) * weights).sum() + out.loss).backward()
    got = (out.quantized.view(n, d), out.image_ids.view(n), out.loss, x.grad.clone(), ibq.codebook.grad.clone())

    x.grad, ibq.codebook.grad = None, None
    quantized, ids, loss = dense_ibq(ibq, x)
    ((quantized * weights).sum() + loss).backward()
    want = (quantized, ids, loss, x.grad, ibq.codebook.grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ibq_every_code_gets_gradient_and_latents_too():
    torch.manual_seed(1)
    ibq = IndexBackpropQuantizer(8, 64, tile_elements=64 * 5).train()
    latents = torch.randn(2, 8, 3, 3, requires_grad=True)  # 18 latents, 64 codes
    out = ibq(latents)
    assert out.image_ids.unique().numel() < 64
    (out.quantized.square().sum() + out.loss).backward()
    assert (ibq.codebook.grad.abs().sum(1) > 0).all(), "IBQ must update every code, not only the picked ones"
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_ibq_ids_are_argmax_and_lookup_reproduces_quantized():
    torch.manual_seed(2)
    ibq = IndexBackpropQuantizer(6, 300, tile_elements=1000).eval()
    latents = torch.randn(2, 6, 5, 7)
    out = ibq(latents)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal(out.image_ids.reshape(-1), (flat.double() @ ibq.codebook.double().t()).argmax(1))
    assert torch.equal(ibq.lookup(out.image_ids), out.quantized)
    assert out.quantized.shape == latents.shape and out.image_ids.shape == (2, 5, 7)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_ibq_memory_is_bounded_by_the_chunk_in_forward_and_backward():
    torch.manual_seed(3)
    n, k, d = 4096, 8192, 8
    ibq = IndexBackpropQuantizer(d, k, entropy_weight=0.1, tile_elements=1 << 17).train()
    x = torch.randn(1, n, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestTensor() as largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ibq(x)
        (out.quantized.sum() + out.loss).backward()
    assert largest.numel <= (1 << 17) < n * k // 100, largest.numel
    assert max(saved) <= max(n, k) * d
    assert (ibq.codebook.grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize(
    "latents,match",
    [
        (torch.full((1, 8, 2, 2), float("nan")), "NaN or Inf"),
        (torch.randn(1, 5, 2, 2), "dimension 5"),
        (torch.randn(8), "must be"),
    ],
)
def test_ibq_bad_latents_raise(latents, match):
    with pytest.raises(ValueError, match=match):
        IndexBackpropQuantizer(8, 4)(latents)


def test_ibq_bad_ids_and_settings_raise():
    ibq = IndexBackpropQuantizer(8, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ibq.lookup(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="temperature"):
        IndexBackpropQuantizer(8, 4, temperature=0.0)


def test_ibq_state_dict_round_trip():
    torch.manual_seed(4)
    a = IndexBackpropQuantizer(8, 32, entropy_weight=0.1).eval()
    b = IndexBackpropQuantizer(8, 32, entropy_weight=0.1).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 4, 4)
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a.quantized, out_b.quantized) and torch.equal(out_a.image_ids, out_b.image_ids)
    assert torch.equal(out_a.loss, out_b.loss)


# ---------------------------------------------------------------------------------------------- VQ lookup_dim
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_vq_lookup_dim_searches_projected_space(distance):
    torch.manual_seed(5)
    vq = VectorQuantizer(16, 40, distance=distance, lookup_dim=4, kmeans_init=False).eval()
    assert vq.codebook.shape == (40, 4)
    latents = torch.randn(2, 16, 3, 5)
    out = vq(latents)
    assert out.quantized.shape == latents.shape and out.image_ids.shape == (2, 3, 5)
    low = vq.project_in(latents.permute(0, 2, 3, 1).reshape(-1, 16))
    codes = vq.codebook
    if distance == "cosine":
        low, codes = F.normalize(low, dim=-1), F.normalize(codes, dim=-1)
    brute = torch.cdist(low.double(), codes.double()).argmin(1)
    assert torch.equal(out.image_ids.reshape(-1), brute)
    assert torch.equal(vq.lookup(out.image_ids), out.quantized)


def test_vq_lookup_dim_gradients_reach_both_projections_and_latents():
    torch.manual_seed(6)
    vq = VectorQuantizer(16, 40, lookup_dim=4, kmeans_init=False).train()
    latents = torch.randn(2, 9, 16, requires_grad=True)
    out = vq(latents)
    (out.quantized.square().sum() + out.loss).backward()
    for p in (vq.project_in.weight, vq.project_out.weight, vq.codebook, latents):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_vq_lookup_dim_kmeans_init_runs_in_projected_space():
    torch.manual_seed(7)
    vq = VectorQuantizer(16, 8, lookup_dim=3, kmeans_init=True, kmeans_iters=3).train()
    vq(torch.randn(1, 64, 16))
    assert bool(vq.initialized) and vq.codebook.shape == (8, 3)


# ---------------------------------------------------------------------------------------------- rotation trick
def paired_quantizers(**kwargs):
    plain = VectorQuantizer(kmeans_init=False, **kwargs)
    rotated = VectorQuantizer(kmeans_init=False, rotation_trick=True, **kwargs)
    rotated.load_state_dict(plain.state_dict())
    return plain, rotated


@pytest.mark.parametrize("kwargs", [{}, {"distance": "cosine"}, {"lookup_dim": 3}])
def test_rotation_trick_keeps_forward_values_and_changes_gradients(kwargs):
    torch.manual_seed(8)
    plain, rotated = paired_quantizers(dim=6, codebook_size=12, **kwargs)
    x = torch.randn(2, 10, 6)
    weights = torch.randn(2, 10, 6)
    grads = []
    for vq in (plain, rotated):
        xi = x.clone().requires_grad_(True)
        out = vq(xi)
        grads.append((out, xi))
        (out.quantized * weights).sum().backward()
    (out_p, x_p), (out_r, x_r) = grads
    assert torch.equal(out_p.quantized, out_r.quantized) and torch.equal(out_p.image_ids, out_r.image_ids)
    assert torch.equal(out_p.loss, out_r.loss)
    assert not torch.allclose(x_p.grad, x_r.grad)


def test_rotation_trick_gradient_matches_hand_computed_2d_example():
    # e = (1, 0), q = (0, 2): R is the 90 degree rotation [[0, -1], [1, 0]] and lambda = |q| / |e| = 2,
    # so d(out)/de = 2 R and the gradient of sum(w * out) w.r.t. e is 2 R^T w.
    vq = VectorQuantizer(2, 1, kmeans_init=False, rotation_trick=True)
    vq.codebook.data = torch.tensor([[0.0, 2.0]])
    for w, expected in [([1.0, 0.0], [0.0, -2.0]), ([0.0, 1.0], [2.0, 0.0])]:
        e = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
        out = vq(e)
        assert torch.equal(out.quantized, torch.tensor([[[0.0, 2.0]]]))
        (out.quantized * torch.tensor(w)).sum().backward()
        torch.testing.assert_close(e.grad, torch.tensor([[expected]]))


def test_rotation_trick_cosine_hand_example():
    # Cosine: both sides are unit vectors (lambda = 1); x = (2, 0) normalises to e = (1, 0) with Jacobian
    # (I - e e^T) / 2, so w = (1, 0) gives R^T w = (0, -1) and a latent gradient of (0, -0.5).
    vq = VectorQuantizer(2, 1, distance="cosine", kmeans_init=False, rotation_trick=True)
    vq.codebook.data = torch.tensor([[0.0, 3.0]])
    x = torch.tensor([[[2.0, 0.0]]], requires_grad=True)
    out = vq(x)
    torch.testing.assert_close(out.quantized, torch.tensor([[[0.0, 1.0]]]))
    (out.quantized * torch.tensor([1.0, 0.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[0.0, -0.5]]]))


def test_rotate_onto_jacobian_is_a_scaled_rotation_taking_e_to_q():
    torch.manual_seed(9)
    e, q = torch.randn(5, dtype=torch.double), torch.randn(5, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda v: rotate_onto(v[None], q[None])[0], e)
    scale = q.norm() / e.norm()
    rot = jac / scale
    torch.testing.assert_close(rot @ rot.t(), torch.eye(5, dtype=torch.double))
    torch.testing.assert_close(rot @ (e / e.norm()), q / q.norm())
    torch.testing.assert_close(rotate_onto(e[None], q[None])[0], q)
    # degenerate rows: zero latent (identity) and antipodal latent/code (R e = -e) stay finite and correct
    torch.testing.assert_close(rotate_onto(-q[None], q[None])[0], q)
    assert torch.isfinite(rotate_onto(torch.zeros(1, 5, dtype=torch.double), q[None])).all()


def test_vq_extensions_state_dict_round_trip():
    torch.manual_seed(10)
    a = VectorQuantizer(8, 16, lookup_dim=3, rotation_trick=True, kmeans_init=False).eval()
    b = VectorQuantizer(8, 16, lookup_dim=3, rotation_trick=True, kmeans_init=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(a(x).quantized, b(x).quantized) and torch.equal(a(x).image_ids, b(x).image_ids)
    assert set(a.state_dict()) >= {"codebook", "project_in.weight", "project_out.weight"}
