import pytest
import torch

from tokenizer_bridge.quantizers.residual import ResidualQuantizer
from tokenizer_bridge.quantizers.unicode import (
    LanguageDrivenQuantizer,
    UnifiedCodebookQuantizer,
    select_token_ids,
)
from tokenizer_bridge.quantizers.vq import VectorQuantizer


def vq_factory(dim=8, k=16, **kwargs):
    return lambda: VectorQuantizer(dim=dim, codebook_size=k, **kwargs)


def fitted_rvq(levels=4, dim=8, k=16, seed=0, **kwargs):
    """An RVQ whose levels were k-means-initialised on one training batch; returns (rvq in eval, that batch)."""
    torch.manual_seed(seed)
    rvq = ResidualQuantizer(vq_factory(dim, k, kmeans_iters=10), num_levels=levels, **kwargs).train()
    data = torch.randn(4, 64, dim)
    rvq(data)
    return rvq.eval(), data


# ---------------------------------------------------------------------------------------------- residual
def test_residual_ids_have_a_level_axis_for_maps_and_sequences():
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3).eval()
    maps = rvq(torch.randn(2, 8, 5, 6))
    assert maps.image_ids.shape == (2, 5, 6, 3) and maps.quantized.shape == (2, 8, 5, 6)
    seqs = rvq(torch.randn(2, 7, 8))
    assert seqs.image_ids.shape == (2, 7, 3) and seqs.quantized.shape == (2, 7, 8)
    assert rvq.num_levels == 3 and rvq.codebook_size == 16 and rvq.dim == 8


def test_residual_lookup_reproduces_quantized_output():
    rvq, data = fitted_rvq()
    out = rvq(data)
    torch.testing.assert_close(rvq.lookup(out.image_ids), out.quantized)
    maps = torch.randn(2, 8, 3, 4)
    out = rvq(maps)
    torch.testing.assert_close(rvq.lookup(out.image_ids), out.quantized)
    assert rvq.lookup(out.image_ids, channels_first=False).shape == (2, 3, 4, 8)


def test_residual_ids_are_nearest_codes_of_each_residual():
    rvq, data = fitted_rvq(levels=3)
    ids = rvq(data).image_ids.reshape(-1, 3)
    residual = data.reshape(-1, 8)
    for level in range(3):
        codebook = rvq.level_quantizer(level).codebook.detach()
        expected = torch.cdist(residual.double(), codebook.double()).argmin(1)
        assert torch.equal(ids[:, level], expected)
        residual = residual - codebook[ids[:, level]]


def test_error_decreases_strictly_with_levels():
    errors = torch.zeros(5)
    for seed in range(3):
        rvq, data = fitted_rvq(levels=5, seed=seed)
        ids = rvq(data).image_ids
        reconstructions = [rvq.lookup(ids, levels=n).detach() for n in range(1, 6)]
        errors += torch.stack([(data - r).norm(dim=-1).mean() for r in reconstructions])
    assert (errors[1:] < errors[:-1]).all(), errors
    assert errors[-1] < 0.5 * errors[0]


def test_lookup_prefix_uses_only_the_first_levels():
    rvq, data = fitted_rvq(levels=3)
    ids = rvq(data).image_ids
    first = rvq.level_quantizer(0).codebook.detach()[ids[..., 0]]
    torch.testing.assert_close(rvq.lookup(ids, levels=1), first)
    with pytest.raises(ValueError, match=r"levels must lie in \[1, 3\]"):
        rvq.lookup(ids, levels=4)
    with pytest.raises(ValueError, match="levels must lie"):
        rvq.lookup(ids, levels=0)


def test_shared_and_separate_codebooks():
    shared = ResidualQuantizer(vq_factory(), num_levels=4, shared_codebook=True)
    separate = ResidualQuantizer(vq_factory(), num_levels=4)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate == 4 * n_shared == 4 * 16 * 8
    assert shared.shared_codebook and not separate.shared_codebook
    assert all(shared.level_quantizer(level) is shared.level_quantizer(0) for level in range(4))
    assert len({id(separate.level_quantizer(level)) for level in range(4)}) == 4
    # a single instance is shared; a list gives one module per level
    vq = VectorQuantizer(8, 16)
    assert ResidualQuantizer(vq, num_levels=3, shared_codebook=True).level_quantizer(2) is vq
    levels = [VectorQuantizer(8, 16) for _ in range(3)]
    from_list = ResidualQuantizer(levels)
    assert from_list.num_levels == 3 and from_list.level_quantizer(1) is levels[1]


def test_shared_codebook_keys_round_trip():
    torch.manual_seed(0)
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3, shared_codebook=True).eval()
    assert list(rvq.state_dict()) == ["quantizers.0.codebook", "quantizers.0.initialized", "quantizers.0.usage"]


def test_quantizer_dropout_uses_prefixes_in_training_only():
    rvq, _ = fitted_rvq(levels=4, quantizer_dropout=1.0)
    data = torch.randn(32, 8, 2, 2)
    rvq.train()
    torch.manual_seed(1)
    out = rvq(data)
    prefixes = [rvq.lookup(out.image_ids, levels=n) for n in range(1, 5)]
    used = []
    for sample in range(32):
        matches = [n + 1 for n in range(4) if torch.allclose(out.quantized[sample], prefixes[n][sample], atol=1e-5)]
        assert matches, f"sample {sample} is not a prefix of its levels"
        used.append(matches[0])
    assert min(used) < 4 and len(set(used)) > 1
    assert out.image_ids.shape == (32, 2, 2, 4)  # ids always hold every level
    assert 1 <= out.metrics["active_levels"] < 4
    rvq.eval()
    out = rvq(data)
    torch.testing.assert_close(out.quantized, prefixes[3])
    assert "active_levels" not in out.metrics


def test_gradients_reach_input_and_every_level():
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3).train()
    latents = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = rvq(latents)
    (out.quantized.square().sum() + out.loss).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    for level in range(3):
        assert rvq.level_quantizer(level).codebook.grad.abs().sum() > 0


def test_straight_through_gradient_is_identity():
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3).train()
    latents = torch.randn(2, 6, 8, requires_grad=True)
    weights = torch.randn(2, 6, 8)
    (rvq(latents).quantized * weights).sum().backward()
    torch.testing.assert_close(latents.grad, weights)


def test_loss_and_metrics_per_level():
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3).eval()
    out = rvq(torch.randn(2, 10, 8))
    level_losses = [out.metrics[f"level{level}/loss"] for level in range(3)]
    assert out.loss.item() == pytest.approx(sum(level_losses), rel=1e-5)
    for level in range(3):
        assert 1 <= out.metrics[f"level{level}/perplexity"] <= 16
        assert 0 < out.metrics[f"level{level}/codebook_usage"] <= 1
    mean_ppl = sum(out.metrics[f"level{level}/perplexity"] for level in range(3)) / 3
    assert out.metrics["perplexity"] == pytest.approx(mean_ppl)
    assert out.metrics["residual_error"] == out.metrics["level2/residual_error"]


def test_lookup_range_errors_name_the_level():
    rvq = ResidualQuantizer(vq_factory(kmeans_init=False), num_levels=3)
    ids = torch.zeros(1, 2, 2, 3, dtype=torch.long)
    ids[0, 1, 1, 2] = 16
    with pytest.raises(ValueError, match=r"level 2 must lie in \[0, 16\), got range \[0, 16\]"):
        rvq.lookup(ids)
    ids[0, 1, 1, 2], ids[0, 0, 0, 1] = 0, -1
    with pytest.raises(ValueError, match="level 1"):
        rvq.lookup(ids)
    with pytest.raises(ValueError, match="trailing level axis of size 3"):
        rvq.lookup(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        rvq.lookup(torch.zeros(1, 2, 3))


def test_single_level_lookup_unchanged():
    vq = VectorQuantizer(dim=8, codebook_size=4, kmeans_init=False)
    with pytest.raises(ValueError, match=r"^image ids must lie in \[0, 4\), got range \[0, 4\]$"):
        vq.lookup(torch.tensor([[[0, 4]]]))
    assert vq.lookup(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 8)


def test_state_dict_round_trip_gives_identical_outputs():
    rvq, data = fitted_rvq(levels=3)
    fresh = ResidualQuantizer(vq_factory(kmeans_iters=10), num_levels=3).eval()
    fresh.load_state_dict(rvq.state_dict())
    a, b = rvq(data), fresh(data)
    assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.quantized, b.quantized)
    assert torch.equal(rvq.lookup(a.image_ids), fresh.lookup(a.image_ids))


def test_bad_residual_configurations_raise():
    with pytest.raises(ValueError, match="same codebook size"):
        ResidualQuantizer([VectorQuantizer(8, 16), VectorQuantizer(8, 32)])
    with pytest.raises(ValueError, match="same dim"):
        ResidualQuantizer([VectorQuantizer(8, 16), VectorQuantizer(4, 16)])
    with pytest.raises(ValueError, match="num_levels"):
        ResidualQuantizer(vq_factory())
    with pytest.raises(ValueError, match="shared_codebook=True"):
        ResidualQuantizer(VectorQuantizer(8, 16), num_levels=2)
    with pytest.raises(ValueError, match="quantizer_dropout"):
        ResidualQuantizer(vq_factory(), num_levels=2, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match="single-level"):
        ResidualQuantizer([ResidualQuantizer(vq_factory(), num_levels=2)] * 2)
    with pytest.raises(ValueError, match="empty"):
        ResidualQuantizer([])


def test_residual_wraps_fsq():
    from tokenizer_bridge.quantizers import fsq

    rvq = ResidualQuantizer(lambda: fsq.FiniteScalarQuantizer(levels=[5, 5, 5]), num_levels=3).eval()
    latents = torch.randn(2, 3, 4, 4)
    out = rvq(latents)
    assert out.image_ids.shape == (2, 4, 4, 3)
    torch.testing.assert_close(rvq.lookup(out.image_ids), out.quantized)
    first = (latents - rvq.lookup(out.image_ids, levels=1)).norm()
    assert (latents - out.quantized).norm() < first


# ---------------------------------------------------------------------------------------------- unified codebook
def tiny_embeddings(vocab=100, hidden=32, seed=0):
    return torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))


def test_unified_codebook_rows_are_projected_embeddings():
    emb, token_ids = tiny_embeddings(), torch.tensor([3, 7, 11, 50, 99, 0])
    q = UnifiedCodebookQuantizer(emb, token_ids, dim=8)
    assert q.codebook_size == 6 and q.dim == 8
    torch.testing.assert_close(q.codes(), q.language.projection(emb[token_ids]))
    same = UnifiedCodebookQuantizer(emb, token_ids)  # D == H: the codebook is the embedding rows themselves
    assert torch.equal(same.codes(), emb[token_ids])
    assert sum(p.numel() for p in same.parameters()) == 0
    assert sum(p.numel() for p in q.parameters()) == 32 * 8 + 8  # only the projection trains


def test_unified_ids_are_nearest_codes_and_lookup_round_trips():
    q = UnifiedCodebookQuantizer(tiny_embeddings(), select_token_ids(100, 40), dim=8).eval()
    latents = torch.randn(2, 8, 5, 5)
    out = q(latents)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(flat.double(), q.codes().detach().double()).argmin(1)
    assert torch.equal(out.image_ids.reshape(-1), expected)
    torch.testing.assert_close(q.lookup(out.image_ids), out.quantized)


def test_unified_token_id_mapping():
    token_ids = torch.tensor([42, 5, 77, 13])
    q = UnifiedCodebookQuantizer(tiny_embeddings(), token_ids, dim=8).eval()
    out = q(torch.randn(3, 10, 8))
    llm_ids = q.to_token_ids(out.image_ids)
    assert llm_ids.shape == out.image_ids.shape and torch.isin(llm_ids, token_ids).all()
    assert torch.equal(q.from_token_ids(llm_ids), out.image_ids)
    assert torch.equal(q.to_token_ids(torch.arange(4)), token_ids)
    with pytest.raises(ValueError, match=r"\[6\] are not in the unified codebook"):
        q.from_token_ids(torch.tensor([42, 6]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        q.to_token_ids(torch.tensor([4]))


def test_unified_loss_trains_projection_and_passes_gradient():
    q = UnifiedCodebookQuantizer(tiny_embeddings(), select_token_ids(100, 20), dim=8).train()
    latents = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(latents)
    (out.quantized.sum() + out.loss).backward()
    assert latents.grad.abs().sum() > 0 and q.language.projection.weight.grad.abs().sum() > 0


def test_unified_state_dict_keeps_only_chosen_rows():
    emb = tiny_embeddings()
    q = UnifiedCodebookQuantizer(emb, [1, 2, 3], dim=8).eval()
    state = q.state_dict()
    assert state["language.rows"].shape == (3, 32) and torch.equal(state["language.token_ids"], torch.tensor([1, 2, 3]))
    fresh = UnifiedCodebookQuantizer(torch.zeros(100, 32), [7, 8, 9], dim=8)
    fresh.load_state_dict(state)
    x = torch.randn(2, 5, 8)
    assert torch.equal(q(x).quantized, fresh(x).quantized) and torch.equal(fresh.token_ids, torch.tensor([1, 2, 3]))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def test_from_llm_uses_input_embeddings():
    model = tiny_llama()
    q = UnifiedCodebookQuantizer.from_llm(model, 10, dim=16)
    assert q.codebook_size == 10 and q.dim == 16
    assert torch.equal(q.token_ids, torch.arange(3, 13))  # the first 10 ids that are not pad/bos/eos
    weight = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(q.language.rows, weight[q.token_ids])
    explicit = UnifiedCodebookQuantizer.from_llm(model, [5, 60, 99])
    assert torch.equal(explicit.codes(), weight[[5, 60, 99]])
    out = q.eval()(torch.randn(1, 16, 2, 2))
    assert ((q.to_token_ids(out.image_ids) >= 3) & (q.to_token_ids(out.image_ids) < 13)).all()
    driven = LanguageDrivenQuantizer.from_llm(model, 8, dim=32)
    torch.testing.assert_close(driven.codebook.detach(), weight[3:11])


def test_select_token_ids():
    assert torch.equal(select_token_ids(10, 3), torch.tensor([0, 1, 2]))
    assert torch.equal(select_token_ids(10, 3, exclude=[0, 2]), torch.tensor([1, 3, 4]))
    assert torch.equal(select_token_ids(10, strategy=[9, 4]), torch.tensor([9, 4]))

    class Tokenizer:
        all_special_ids = [0, 1]

        def __len__(self):
            return 6

    assert torch.equal(select_token_ids(Tokenizer(), 4), torch.tensor([2, 3, 4, 5]))
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        select_token_ids(Tokenizer(), 5)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        select_token_ids(10, 11)
    with pytest.raises(ValueError, match="k=3 but 2"):
        select_token_ids(10, 3, strategy=[1, 2])
    with pytest.raises(ValueError, match="strategy"):
        select_token_ids(10, 3, strategy="frequent")


@pytest.mark.parametrize(
    "token_ids,match",
    [([], "non-empty"), ([1, 2, 2], r"duplicates: \[2\]"), ([0, 100], r"\[0, 100\)"), ([-1], r"\[0, 100\)"),
     ([[1, 2]], "1-D"), ([0.5], "integers"), (list(range(101)), r"\[0, 100\)")],
)
def test_bad_token_ids_raise(token_ids, match):
    with pytest.raises(ValueError, match=match):
        UnifiedCodebookQuantizer(tiny_embeddings(), token_ids, dim=8)
    with pytest.raises(ValueError, match=match):
        LanguageDrivenQuantizer(tiny_embeddings(), token_ids, dim=8)


def test_projection_false_needs_matching_dim():
    with pytest.raises(ValueError, match="projection=False"):
        UnifiedCodebookQuantizer(tiny_embeddings(), [1, 2], dim=8, projection=False)
    forced = UnifiedCodebookQuantizer(tiny_embeddings(), [1, 2], projection=True)  # identity-initialised Linear
    torch.testing.assert_close(forced.codes(), tiny_embeddings()[[1, 2]])
    assert forced.language.trainable


# ---------------------------------------------------------------------------------------------- language-driven
def test_language_update_moves_codebook_geometrically():
    emb, token_ids = tiny_embeddings(hidden=8), torch.arange(10, 30)
    q = LanguageDrivenQuantizer(emb, token_ids, decay=0.9, init_from_language=False, kmeans_init=False)
    target = emb[token_ids]
    distances = [float((q.codebook.detach() - target).norm())]
    for _ in range(5):
        q.language_update()
        distances.append(float((q.codebook.detach() - target).norm()))
    for before, after in zip(distances, distances[1:]):
        assert after == pytest.approx(0.9 * before, rel=1e-4)


def test_language_update_runs_once_per_training_forward_only():
    emb = tiny_embeddings(hidden=8)
    q = LanguageDrivenQuantizer(emb, torch.arange(16), decay=0.5, init_from_language=False, kmeans_init=False)
    target = emb[:16]
    start = (q.codebook.detach() - target).norm()
    q.eval()(torch.randn(2, 4, 8))
    assert (q.codebook.detach() - target).norm() == start
    out = q.train()(torch.randn(2, 4, 8))
    torch.testing.assert_close((q.codebook.detach() - target).norm(), 0.5 * start)
    assert out.metrics["language_distance"] == pytest.approx(float((q.codebook.detach() - target).pow(2).mean()))
    manual = LanguageDrivenQuantizer(emb, torch.arange(16), auto_update=False, init_from_language=False).train()
    before = manual.codebook.detach().clone()
    manual.vq.initialized.fill_(True)
    manual(torch.randn(2, 4, 8))
    assert torch.equal(manual.codebook.detach(), before)


def test_language_driven_quantizer_is_a_vq_with_token_ids():
    emb = tiny_embeddings()
    q = LanguageDrivenQuantizer(emb, [4, 8, 15, 16, 23, 42], dim=8).eval()
    torch.testing.assert_close(q.codebook.detach(), q.language().detach())  # initialised from language
    latents = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(latents)
    torch.testing.assert_close(q.lookup(out.image_ids), out.quantized)
    assert torch.isin(q.to_token_ids(out.image_ids), torch.tensor([4, 8, 15, 16, 23, 42])).all()
    q.train()
    out = q(latents)
    (out.quantized.sum() + out.loss).backward()
    assert latents.grad.abs().sum() > 0
    assert q.codebook.grad.abs().sum() > 0 and q.language.projection.weight.grad.abs().sum() > 0  # alignment term
    with pytest.raises(ValueError, match="learned codebook"):
        LanguageDrivenQuantizer(emb, [1, 2], dim=8, codebook_update="ema")
    with pytest.raises(ValueError, match="decay"):
        LanguageDrivenQuantizer(emb, [1, 2], dim=8, decay=1.0)
