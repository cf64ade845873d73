"""Images of different sizes in one ViT batch: padding masked out of attention, results equal to one-by-one."""

import pytest
import torch

from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.nn.vit import ViTDecoder, ViTEncoder, grid_mask, pad_images

TINY = dict(width=32, depth=2, num_heads=2, patch_size=4)
SIZES = [(16, 24), (8, 8), (24, 12), (16, 24)]


def images(sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=gen) * 2 - 1 for h, w in sizes]


def test_pad_images_pads_bottom_right_and_records_sizes():
    ims = images()
    batch, sizes = pad_images(ims, multiple=4)
    assert batch.shape == (4, 3, 24, 24) and sizes.tolist() == [list(s) for s in SIZES]
    for im, padded in zip(ims, batch):
        h, w = im.shape[1:]
        assert torch.equal(padded[:, :h, :w], im)
        assert padded[:, h:].abs().sum() == 0 and padded[:, :, w:].abs().sum() == 0
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        pad_images([torch.zeros(3, 8, 10)], multiple=4)
    with pytest.raises(ValueError, match="same C"):
        pad_images([torch.zeros(3, 8, 8), torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match="at least one"):
        pad_images([])


def test_grid_mask_marks_the_top_left_part():
    mask = grid_mask([[1, 2], [2, 1]], 2, 3)
    assert mask.tolist() == [[True, True, False, False, False, False], [True, False, False, True, False, False]]
    with pytest.raises(ValueError, match="padded grid"):
        grid_mask([[3, 1]], 2, 3)


def test_masked_encoder_and_decoder_equal_one_image_at_a_time():
    torch.manual_seed(0)
    encoder, decoder = ViTEncoder(latent_dim=8, **TINY).eval(), ViTDecoder(latent_dim=8, **TINY).eval()
    ims = images()
    batch, sizes = pad_images(ims, multiple=4)
    with torch.no_grad():
        latents = encoder(batch, sizes)
        pixels = decoder(latents, sizes // 4)
        for i, im in enumerate(ims):
            h, w = im.shape[1] // 4, im.shape[2] // 4
            alone = encoder(im[None])
            torch.testing.assert_close(latents[i : i + 1, :, :h, :w], alone, atol=1e-5, rtol=1e-5)
            assert latents[i, :, h:].abs().sum() == 0 and latents[i, :, :, w:].abs().sum() == 0
            torch.testing.assert_close(pixels[i : i + 1, :, : 4 * h, : 4 * w], decoder(alone), atol=1e-5, rtol=1e-5)
        unmasked = encoder(batch)  # without sizes the padding leaks into the smaller images' tokens
    assert not torch.allclose(unmasked[1, :, :2, :2], latents[1, :, :2, :2], atol=1e-4)
    with pytest.raises(ValueError, match="image_sizes"):
        encoder(batch, sizes[:2])


def test_gradients_do_not_flow_from_padding():
    torch.manual_seed(0)
    encoder = ViTEncoder(latent_dim=8, **TINY)
    batch, sizes = pad_images(images([(8, 8), (16, 16)]), multiple=4)
    batch.requires_grad_(True)
    encoder(batch, sizes).sum().backward()
    assert batch.grad[0, :, 8:].abs().sum() == 0 and batch.grad[0, :, :, 8:].abs().sum() == 0
    assert batch.grad[0, :, :8, :8].abs().sum() > 0


def vit_tokenizer(levels=1):
    options = dict(width=32, depth=1, num_heads=2)
    quantizer = {"type": "vq", "codebook_size": 32, "kmeans_init": False, "num_levels": levels}
    return VisualTokenizer(VisualTokenizerConfig(encoder="vit", decoder="vit", base_channels=16, latent_dim=8,
                                                 quantizer=quantizer, downsample=4, image_size=16,
                                                 encoder_options=options, decoder_options=options)).eval()


@pytest.mark.parametrize("levels", [1, 2])
def test_tokenizer_encodes_and_decodes_a_mixed_list_like_one_by_one(levels):
    torch.manual_seed(0)
    model = vit_tokenizer(levels)
    ims = images()
    ids = model.encode_images(ims)
    for im, got in zip(ims, ids):
        expected = model.encode(im[None])[0]
        assert got.shape == expected.shape == (im.shape[1] // 4, im.shape[2] // 4, *([levels] if levels > 1 else []))
        assert torch.equal(got, expected)
    pixels = model.decode_images(ids)
    for im, got, i in zip(ims, pixels, ids):
        assert got.shape == im.shape
        torch.testing.assert_close(got, model.decode(i[None])[0], atol=1e-5, rtol=1e-5)


def test_conv_tokenizer_groups_by_size_and_keeps_the_order():
    torch.manual_seed(0)
    quantizer = {"type": "vq", "codebook_size": 16, "kmeans_init": False}
    model = VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, quantizer=quantizer, downsample=4,
                                                  channel_mult=[1, 2], image_size=16)).eval()
    ims = images()
    ids = model.encode_images(ims)
    assert [tuple(i.shape) for i in ids] == [(h // 4, w // 4) for h, w in SIZES]
    assert torch.equal(ids[0], model.encode(ims[0][None])[0]) and torch.equal(ids[3], model.encode(ims[3][None])[0])
    assert [tuple(p.shape) for p in model.decode_images(ids)] == [(3, h, w) for h, w in SIZES]


def test_bad_lists_are_refused():
    model = vit_tokenizer()
    with pytest.raises(ValueError, match="non-empty list"):
        model.encode_images([torch.zeros(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="not a multiple"):
        model.encode_images([torch.zeros(3, 8, 10)])
    with pytest.raises(ValueError, match="id maps"):
        model.decode_images([torch.zeros(2, 2, 2, dtype=torch.long)])
