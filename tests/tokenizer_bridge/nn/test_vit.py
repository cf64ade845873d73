"""ViT encoder/decoder: any H x W, 2-D RoPE relative-position property, conv-style constructor, trains with FSQ."""

import pytest
import torch
import torch.nn.functional as F

from tokenizer_bridge.nn.vit import (
    ViTDecoder,
    ViTEncoder,
    apply_rope,
    attention_mask,
    grid_angles,
    overlap_add,
    pad_images,
    rope_angles,
    tent_window,
)
from tokenizer_bridge.quantizers import FiniteScalarQuantizer

TINY = dict(width=32, depth=1, num_heads=2, patch_size=4)


@pytest.mark.parametrize("height,width", [(32, 32), (16, 48), (48, 24), (4, 8)])
def test_any_size_and_aspect_ratio_round_trips_shapes(height, width):
    torch.manual_seed(0)
    encoder, decoder = ViTEncoder(latent_dim=8, **TINY), ViTDecoder(latent_dim=8, **TINY)
    x = torch.rand(2, 3, height, width) * 2 - 1
    latents = encoder(x)
    assert latents.shape == (2, 8, height // 4, width // 4)
    assert decoder(latents).shape == x.shape


def test_size_not_divisible_by_patch_is_refused():
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        ViTEncoder(latent_dim=8, **TINY)(torch.zeros(1, 3, 30, 32))


def test_conv_style_arguments_map_to_patch_and_width():
    # The ENCODERS contract: (in_channels, base_channels, channel_mult, num_res_blocks, latent_dim).
    enc = ViTEncoder(in_channels=3, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, latent_dim=8)
    dec = ViTDecoder(out_channels=3, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, latent_dim=8)
    assert enc.patch_size == dec.patch_size == 8
    assert enc.patch_embed.out_channels == 32 and len(enc.stack.blocks) == 3
    x = torch.rand(1, 3, 16, 40) * 2 - 1
    assert dec(enc(x)).shape == x.shape


def test_unsplittable_heads_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTEncoder(latent_dim=8, width=24, depth=1, num_heads=4, patch_size=4)  # head dim 6


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(hd), torch.randn(hd)

    def score(pos_q, pos_k):
        rows, cols = torch.tensor([pos_q[0], pos_k[0]]), torch.tensor([pos_q[1], pos_k[1]])
        rotated = apply_rope(torch.stack([q, k]), rope_angles(rows, cols, hd))
        return rotated[0] @ rotated[1]

    base = score((1, 2), (3, 7))
    for shift in [(5, 0), (0, 4), (-2, 9), (13, -6)]:
        shifted = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 7 + shift[1]))
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    # Not trivially invariant: another offset, or swapping the row and column offsets, changes the score.
    assert not torch.allclose(score((0, 0), (1, 0)), score((0, 0), (0, 1)), atol=1e-3)
    assert not torch.allclose(score((0, 0), (2, 4)), base, atol=1e-3)
    # Rotation keeps norms, and position (0, 0) is the identity.
    assert torch.allclose(apply_rope(q[None], rope_angles(torch.tensor([0]), torch.tensor([0]), hd))[0], q)


def test_grid_angles_are_row_major():
    angles = grid_angles(2, 3, 8)  # rows 0,0,0,1,1,1 ; cols 0,1,2,0,1,2
    assert angles.shape == (6, 4)
    torch.testing.assert_close(angles[:, 0], torch.tensor([0, 0, 0, 1, 1, 1.0]))  # first half: row
    torch.testing.assert_close(angles[:, 2], torch.tensor([0, 1, 2, 0, 1, 2.0]))  # second half: column


def test_no_absolute_positions_uniform_image_gives_uniform_latents():
    # Positions enter only through the RoPE rotation of queries and keys, never the values: on a uniform image every
    # token attends to identical values, so every latent is the same (an absolute position embedding would break it).
    torch.manual_seed(0)
    encoder = ViTEncoder(latent_dim=8, **TINY).eval()
    flat = encoder(torch.full((1, 3, 16, 24), 0.3))
    torch.testing.assert_close(flat, flat[..., :1, :1].expand_as(flat), rtol=1e-4, atol=1e-5)


def smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_tiny_vit_fsq_autoencoder_trains():
    torch.manual_seed(0)
    encoder = ViTEncoder(latent_dim=4, **TINY)
    quantizer = FiniteScalarQuantizer(levels=[7, 7, 7, 7])
    decoder = ViTDecoder(latent_dim=4, **TINY)
    params = [*encoder.parameters(), *quantizer.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    images = smooth_images(8, 32)
    losses = []
    for _ in range(40):
        q = quantizer(encoder(images))
        loss = F.mse_loss(decoder(q.quantized), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert q.image_ids.shape == (8, 8, 8)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_the_refinement_head_starts_as_the_tiles_works_at_any_size_and_keeps_padding_zero():
    torch.manual_seed(0)
    plain = ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4)
    torch.manual_seed(0)
    refined = ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, refine_channels=8)
    latents = torch.randn(2, 8, 3, 5)
    # zero-initialised second conv: the refined decoder starts exactly as the plain one, at every size
    for h, w in ((3, 5), (6, 2)):
        z = torch.randn(1, 8, h, w)
        assert torch.equal(refined(z), plain(z)) and refined(z).shape == (1, 3, 4 * h, 4 * w)
    with torch.no_grad():
        refined.refine[2].weight.normal_()
    out = refined(latents, grid_sizes=torch.tensor([[3, 5], [2, 3]]))
    assert not torch.allclose(out[0], plain(latents)[0])  # the refinement now acts
    assert out[1, :, 8:].abs().max() == 0 and out[1, :, :, 12:].abs().max() == 0  # the padding stays zero
    with pytest.raises(ValueError, match="refine_channels must be an integer >= 0"):
        ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, refine_channels=-1)


def test_overlap_add_of_flat_footprints_is_bilinear_interpolation_of_the_token_colours():
    # a token that paints one colour over its whole 2p x 2p footprint: the blend is exactly bilinear upsampling
    # (align_corners=False, borders clamped), with no seam anywhere
    h, w, p, c = 3, 5, 4, 3
    colours = torch.randn(2, h * w, c)
    footprints = colours[..., None].expand(2, h * w, c, 4 * p * p).reshape(2, h * w, -1)
    expected = F.interpolate(colours.transpose(1, 2).reshape(2, c, h, w), scale_factor=p, mode="bilinear",
                             align_corners=False)
    assert torch.allclose(overlap_add(footprints, h, w, p, c), expected, atol=1e-5)
    window = tent_window(p)
    assert torch.allclose(window[:p] + window[p:], torch.ones(p))  # shifted copies sum to one


def test_the_overlapping_decoder_has_no_tiles_works_at_any_size_and_padded_batches_match_lone_decodes():
    torch.manual_seed(0)
    decoder = ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, overlap=True)
    assert decoder.out.out_features == 3 * 8 * 8  # a 2p x 2p footprint per token
    for h, w in ((1, 1), (3, 5), (6, 2)):
        assert decoder(torch.randn(1, 8, h, w)).shape == (1, 3, 4 * h, 4 * w)
    latents = torch.randn(2, 8, 3, 5)
    out = decoder(latents, grid_sizes=torch.tensor([[3, 5], [2, 3]]))
    assert torch.allclose(out[0], decoder(latents[:1])[0], atol=1e-5)
    assert torch.allclose(out[1, :, :8, :12], decoder(latents[1:, :, :2, :3])[0], atol=1e-5)
    assert out[1, :, 8:].abs().max() == 0 and out[1, :, :, 12:].abs().max() == 0  # the padding stays zero
    # one token's footprint reaches half a patch into its neighbours' patches, no further
    footprints = torch.randn(1, 15, 3 * 8 * 8)
    moved = footprints.clone()
    moved[0, 1 * 5 + 2] += 1  # the token at row 1, column 2: its patch is rows 4-7, columns 8-11
    diff = (overlap_add(moved, 3, 5, 4, 3) - overlap_add(footprints, 3, 5, 4, 3))[0].abs().amax(0)  # (12, 20)
    reach = torch.zeros(12, 20, dtype=torch.bool)
    reach[2:10, 6:14] = True
    assert (diff[reach] > 0).all() and (diff[~reach] == 0).all()
    with pytest.raises(ValueError, match="overlap needs an even patch size"):
        ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=3, overlap=True)
    with pytest.raises(ValueError, match="overlap must be true or false"):
        ViTDecoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, overlap="yes")


def test_the_overlapping_encoder_embeds_2p_windows_and_padded_batches_match_lone_encodes():
    torch.manual_seed(0)
    encoder = ViTEncoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, overlap=True)
    assert encoder.patch_embed.kernel_size == (8, 8) and encoder.patch_embed.stride == (4, 4)
    images = [torch.randn(3, 12, 20), torch.randn(3, 8, 12)]
    batch, sizes = pad_images(images, multiple=4)
    latents = encoder(batch, image_sizes=sizes)
    assert latents.shape == (2, 8, 3, 5)
    assert torch.allclose(latents[1, :, :2, :3], encoder(images[1][None])[0], atol=1e-5)
    # each token sees half a patch of each neighbour: a pixel change two pixels past a patch edge moves it
    moved = images[0][None].clone()
    moved[0, :, 0, 9] += 1  # column 9 lies in patch column 2, two pixels past the edge with patch column 1
    delta = (encoder.patch_embed(moved) - encoder.patch_embed(images[0][None])).abs().amax(1)[0]  # (3, 5)
    assert delta[0, 1] > 0 and delta[0, 2] > 0 and delta[0, 0] == 0 and delta[1].max() == 0


def test_attention_mask_keeps_the_neighbourhood_and_the_padding_out():
    near = attention_mask(3, 3, 1)[0, 0]  # (9, 9), row-major 3x3 grid
    assert near.shape == (9, 9) and torch.equal(near, near.T)
    assert near[0].nonzero().flatten().tolist() == [0, 1, 3, 4]  # the top-left token: its 2x2 corner
    assert near[4].all()  # the centre sees the whole 3x3 grid
    assert torch.equal(attention_mask(3, 3, 2)[0, 0], torch.ones(9, 9, dtype=torch.bool))
    keys = torch.tensor([[True] * 6 + [False] * 3])  # the bottom row is padding
    masked = attention_mask(3, 3, 1, keys)[0, 0]
    assert masked[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert masked[7].nonzero().flatten().tolist() == [3, 4, 5, 7]  # a padding query: real neighbours and itself
    assert not masked[:6, 6:].any()  # no real token attends to padding


@pytest.mark.parametrize("cls", [ViTEncoder, ViTDecoder])
def test_attention_radius_covering_the_grid_is_global_attention_and_a_small_one_is_local(cls):
    torch.manual_seed(0)
    sizes = dict(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4)
    local = cls(**sizes, attention_radius=1)
    full = cls(**sizes)
    full.load_state_dict(local.state_dict())  # the radius adds no parameters
    x = torch.randn(2, 3, 16, 24) if cls is ViTEncoder else torch.randn(2, 8, 4, 6)
    wide = cls(**sizes, attention_radius=5)
    wide.load_state_dict(local.state_dict())
    assert torch.allclose(wide(x), full(x), atol=1e-5)  # radius 5 reaches every token of a 4x6 grid
    moved = x.clone()
    if cls is ViTEncoder:
        moved[:, :, 12:, 20:] += 1  # the pixels of the bottom-right token (row 3, column 5)
        changed = (local(moved) - local(x)).abs().amax(dim=(0, 1))  # (4, 6) latents
    else:
        moved[:, :, 3, 5] += 1
        changed = (local(moved) - local(x)).abs().amax(dim=(0, 1)).view(4, 4, 6, 4).amax(dim=(1, 3))  # per token
    reach = torch.zeros(4, 6, dtype=torch.bool)
    reach[2:, 4:] = True  # one block, radius 1: the token and its neighbours, nothing further
    assert (changed[reach] > 0).all() and (changed[~reach] == 0).all()
    assert not torch.allclose(local(x), full(x), atol=1e-3)


def test_a_local_attention_tokenizer_encodes_padded_batches_like_lone_images_and_checks_its_radius():
    torch.manual_seed(0)
    encoder = ViTEncoder(latent_dim=8, width=16, depth=2, num_heads=2, patch_size=4, attention_radius=1)
    decoder = ViTDecoder(latent_dim=8, width=16, depth=2, num_heads=2, patch_size=4, attention_radius=1)
    images = [torch.randn(3, 12, 20), torch.randn(3, 4, 8)]  # the second one's padding holds far-away tokens
    batch, sizes = pad_images(images, multiple=4)
    latents = encoder(batch, image_sizes=sizes)
    assert torch.isfinite(latents).all() and latents[1, :, 1:].abs().max() == 0
    assert torch.allclose(latents[1, :, :1, :2], encoder(images[1][None])[0], atol=1e-5)
    out = decoder(latents, grid_sizes=sizes // 4)
    assert torch.allclose(out[1, :, :4, :8], decoder(latents[1:, :, :1, :2])[0], atol=1e-5)
    # a radius that spans the 3x5 grid attends without the window mask, and still keeps the padding out
    wide = ViTEncoder(latent_dim=8, width=16, depth=2, num_heads=2, patch_size=4, attention_radius=4)
    wide.load_state_dict(encoder.state_dict())
    spanned = wide(batch, image_sizes=sizes)
    assert torch.allclose(spanned[1, :, :1, :2], wide(images[1][None])[0], atol=1e-5)
    assert torch.allclose(spanned[0], wide(images[0][None])[0], atol=1e-5)
    assert not torch.allclose(spanned[0], latents[0], atol=1e-3)  # radius 1 was local on that grid
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="attention_radius must be null"):
            ViTEncoder(latent_dim=8, width=16, depth=1, num_heads=2, patch_size=4, attention_radius=bad)


def test_attention_radius_is_saved_with_a_visual_tokenizer(tmp_path):
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    options = dict(width=16, depth=1, num_heads=2, attention_radius=1)
    model = VisualTokenizer(VisualTokenizerConfig(encoder="vit", decoder="vit", latent_dim=4, downsample=4,
                                                  quantizer={"type": "fsq", "levels": [5, 5, 5, 5]}, image_size=16,
                                                  encoder_options=options, decoder_options=options)).eval()
    model.save_pretrained(tmp_path)
    loaded = VisualTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.encoder.stack.attention_radius == loaded.decoder.stack.attention_radius == 1
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
