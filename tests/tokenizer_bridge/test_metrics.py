"""Metrics: pixels against scikit-image, text error rates against hand-computed edit distances, rate, alignment
(CKNNA against a direct loop over pairs), learned-feature distances and the HF backbone loader."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenizer_bridge.metrics import (
    FeatureExtractor,
    Features,
    HFBackboneFeatures,
    band_error_ratio,
    bits_per_pixel,
    cer,
    cknna,
    feature_distance_metrics,
    frechet_distance,
    levenshtein,
    lpips_like,
    psnr,
    se_cknna,
    seam_ratio,
    ssim,
    wer,
)


def _pair(shape, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    return x, (x + noise * torch.randn(shape, generator=g)).clamp(-1, 1)


def _skimage_ssim(a, b, data_range):
    return structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=-1)


# ---------------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("shape", [(2, 3, 40, 57), (1, 3, 64, 64), (1, 1, 23, 31)])
def test_psnr_and_ssim_match_scikit_image_in_minus_one_one(shape):
    x, y = _pair(shape)
    ours_psnr, ours_ssim = psnr(y, x, data_range=2.0), ssim(y, x, data_range=2.0)
    for i in range(shape[0]):
        a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        assert float(ours_psnr[i]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=2.0), abs=1e-4)
        assert float(ours_ssim[i]) == pytest.approx(_skimage_ssim(a, b, 2.0), abs=1e-4)


def test_psnr_and_ssim_match_scikit_image_on_uint8_values():
    g = np.random.default_rng(1)
    a = g.integers(0, 256, (48, 48, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + g.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    ta, tb = (torch.from_numpy(v.copy()).permute(2, 0, 1)[None].double() for v in (a, b))
    assert float(psnr(tb, ta, 255)[0]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4)
    assert float(ssim(tb, ta, 255)[0]) == pytest.approx(_skimage_ssim(a, b, 255), abs=1e-4)


def test_ssim_of_identical_images_is_one_and_errors_are_clear():
    x, _ = _pair((2, 3, 32, 32))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[..., :30])


def test_band_error_ratio_reads_lost_frequencies():
    x, _ = _pair((1, 3, 64, 64), noise=0)
    assert band_error_ratio(x, x) == pytest.approx([0.0] * 6, abs=1e-12)
    assert band_error_ratio(x * 0, x) == pytest.approx([1.0] * 6)  # nothing reconstructed: every band lost
    blurred = torch.nn.functional.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    ratios = band_error_ratio(blurred, x)
    assert ratios[0] < 0.3 < ratios[-1]  # block averaging keeps low frequencies, loses high ones


# ------------------------------------------------------------------------------------------------------ text
def test_seam_ratio_reads_a_block_grid():
    torch.manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 68, 68), 5, stride=1)  # (2, 3, 64, 64), no grid
    assert 0.9 < seam_ratio(smooth, 8) < 1.1
    tiles = smooth.view(2, 3, 8, 8, 8, 8).mean(dim=(3, 5), keepdim=True).expand(2, 3, 8, 8, 8, 8).reshape(2, 3, 64, 64)
    assert seam_ratio(tiles, 8) > 100  # flat 8 px tiles: every step is on a seam
    offset_grid = tiles.roll(shifts=(4, 4), dims=(2, 3))  # a grid, but not the tokenizer's
    assert seam_ratio(offset_grid, 8) < 0.5
    # hand example: ramps of 0.1 per pixel both ways, plus a jump of 1 across the seam after column 7
    ramp = torch.arange(16, dtype=torch.float64) * 0.1
    row = ramp.clone()
    row[8:] += 1.0
    image = (row.view(1, 16) + ramp.view(16, 1)).view(1, 1, 16, 16)
    assert seam_ratio(image, 8) == pytest.approx((1.1 / 0.1 + 1.0) / 2)  # horizontal 11x, vertical 1x
    with pytest.raises(ValueError, match="two 8-pixel blocks"):
        seam_ratio(torch.zeros(1, 3, 8, 8), 8)


@pytest.mark.parametrize("ref, hyp, distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("über", "uber", 1),
    ("Ξεσκεπάζω", "Ξεσκεπαζω", 1), ("same", "same", 0),
])
def test_levenshtein_hand_examples(ref, hyp, distance):
    assert levenshtein(ref, hyp) == distance == levenshtein(hyp, ref)


def test_cer_and_wer():
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)
    assert wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)  # 1 substitution, 1 deletion
    assert wer("a b", "a b c d") == pytest.approx(1.0)  # insertions can push error rates to 1 and beyond
    assert cer("", "") == 0.0 and cer("", "x") == 1.0
    assert cer("Größe", "Größe") == 0.0 and cer("Größe", "Grosse") == pytest.approx(3 / 5)  # ö->o, ß->s, +s


# ------------------------------------------------------------------------------------------------------ rate
def test_bits_per_pixel():
    assert bits_per_pixel(32 * 32, 1024, 256, 256) == pytest.approx(32 * 32 * 10 / 65536)
    assert bits_per_pixel(16 * 16, [256, 256], 256, 256) == pytest.approx(256 * 16 / 65536)  # two levels
    assert bits_per_pixel(100, 16, 80, 80) == pytest.approx(4 / 64)  # K=16, downsample 8
    with pytest.raises(ValueError):
        bits_per_pixel(10, 0, 8, 8)


# ------------------------------------------------------------------------------------------------- alignment
def _cknna_loop(a, b, k):
    """CKNNA straight from the paper's sums, one pair at a time."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    kern_a, kern_b = a @ a.T, b @ b.T

    def knn(kern, i):
        others = [j for j in range(n) if j != i]
        return set(sorted(others, key=lambda j: -kern[i, j])[:k])

    def align(ka, kb, use_b_neighbours):
        total = 0.0
        for i in range(n):
            na, nb = knn(ka, i), knn(kb, i) if use_b_neighbours else knn(ka, i)
            for j in range(n):
                if j != i and j in na and j in nb:
                    total += (ka[i, j] - ka[i].mean()) * (kb[i, j] - kb[i].mean())
        return total

    return align(kern_a, kern_b, True) / math.sqrt(align(kern_a, kern_a, False) * align(kern_b, kern_b, False))


@pytest.mark.parametrize("normalize", [False, True])
def test_cknna_equals_a_direct_loop(normalize):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(25, 6, generator=g)
    b = a @ torch.randn(6, 5, generator=g) + 0.7 * torch.randn(25, 5, generator=g)  # related, not identical
    if normalize:
        unit = lambda x: torch.nn.functional.normalize(x.double(), dim=1)  # noqa: E731
        expected = _cknna_loop(unit(a), unit(b), 4)
    else:
        expected = _cknna_loop(a, b, 4)
    assert cknna(a, b, k=4, normalize=normalize) == pytest.approx(expected, abs=1e-10)


def test_cknna_identical_independent_and_invariances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-12)
    assert abs(cknna(a, b)) < 0.1
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    assert cknna(a, 3.0 * a @ rotation) == pytest.approx(1.0, abs=1e-9)  # linear kernels: rotation/scale-blind
    assert 0.1 < cknna(a, a + 0.5 * b) < 1.0
    with pytest.raises(ValueError, match="k < n"):
        cknna(a[:5], b[:5], k=5)
    with pytest.raises(ValueError, match="same samples"):
        cknna(a, b[:10])


def _smooth_images(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def test_se_cknna_is_one_for_an_equivariant_extractor_and_drops_for_a_positional_one():
    weights = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    def per_pixel(x):  # a 1x1 "network" with mean pooling: rotating the image only permutes what it pools
        return torch.tanh(torch.einsum("dc,bchw->bdhw", weights, x)).mean((2, 3))

    def positional(x):  # raw pixels in place: a rotation moves every value to another coordinate
        return x[:, :, ::4, ::4].flatten(1)

    quarter_turn = {"rot90": lambda x, generator: torch.rot90(x, 1, (2, 3))}
    images = _smooth_images()
    same = se_cknna(per_pixel, per_pixel, images, quarter_turn, k=10)
    assert same["clean"] == pytest.approx(1.0) and same["se_cknna"] == pytest.approx(1.0, abs=1e-9)
    assert se_cknna(positional, positional, images, quarter_turn, k=10)["se_cknna"] < 0.8
    noisy = se_cknna(per_pixel, per_pixel, images, k=10)  # default rotation, scaling, noise
    assert set(noisy) == {"clean", "rotation", "scaling", "noise", "se_cknna"}
    assert all(-1 <= v <= 1 for v in noisy.values()) and noisy["se_cknna"] < 1.0
    assert noisy == se_cknna(per_pixel, per_pixel, images, k=10)  # seeded


# ------------------------------------------------------------------------------------------ learned features
def test_frechet_distance_and_lpips_like():
    g = np.random.default_rng(0)
    real = g.normal(size=(500, 4))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, real + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)  # |mean shift|^2, same covariance
    layers = [torch.randn(3, 5, 8)]
    assert torch.allclose(lpips_like(layers, layers), torch.zeros(3))
    assert torch.allclose(lpips_like(layers, [-layers[0]]), torch.full((3,), 4.0))  # opposite unit vectors
    out = feature_distance_metrics(torch.from_numpy(real), torch.from_numpy(real + 1), layers, [2 * layers[0]])
    assert out["num_samples"] == 500 and out["feature_dim"] == 4 and out["lpips_like"] == pytest.approx(0.0, abs=1e-6)
    assert feature_distance_metrics(torch.from_numpy(real), torch.from_numpy(real))["lpips_like"] is None


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(path)
    return path


def test_hf_backbone_features_load_by_path(tiny_vit):
    extractor = HFBackboneFeatures(tiny_vit)
    assert isinstance(extractor, FeatureExtractor) and extractor.input_size == 32
    out = extractor(torch.rand(3, 3, 48, 40) * 2 - 1)  # any size in: resized to the backbone's 32 px
    assert isinstance(out, Features) and out.pooled.shape == (3, 32)
    assert len(out.layers) == 1 and out.layers[0].shape == (3, 17, 32)  # 16 patches + CLS
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(extractor(x).pooled, extractor(x).pooled)


def test_hf_backbone_features_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature-extractor weights"):
        HFBackboneFeatures(tmp_path / "nowhere")
