"""Pretrained VQ tokenizers of transformers (Emu3, Janus, Chameleon) behind the VisualTokenizer interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.interface import load_visual_tokenizer
from tokenizer_bridge.modeling_pretrained_vq import (
    PretrainedVQConfig,
    PretrainedVQTokenizer,
)

SIZE = 16  # px; three conv levels -> downsample 4 -> 4x4 id grids
TINY = dict(
    emu3=dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1],
              num_res_blocks=1, attn_resolutions=[], hidden_size=32),  # default temporal_downsample_factor=4
    janus=dict(embed_dim=4, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1],
               num_res_blocks=1, num_patches=4, projection_dim=16, image_token_embed_dim=16),
    chameleon=dict(embed_dim=4, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1],
                   num_res_blocks=1, resolution=SIZE, attn_resolutions=[]),
)


def tiny_vq(family: str, seed: int = 0):
    """A random bare VQ model of ``family`` (the transformers class, not our wrapper)."""
    from tokenizer_bridge.modeling_pretrained_vq import FAMILIES

    torch.manual_seed(seed)
    fam = FAMILIES[family]
    return fam.model_class()(fam.config_class()(**TINY[family])).eval()


@pytest.fixture(scope="module")
def vqs():
    return {family: tiny_vq(family) for family in TINY}


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.rand(2, 3, SIZE, SIZE) * 2 - 1


def test_emu3_matches_its_own_encode_and_decode(vqs, pixels):
    emu3 = vqs["emu3"]
    tok = PretrainedVQTokenizer.from_vq_model(emu3)
    assert (tok.codebook_size, tok.config.downsample, tok.config.grid_size(16, 32)) == (64, 4, (4, 8))
    ids = tok.encode(pixels)
    with torch.no_grad():
        theirs = torch.stack(emu3.encode(pixels, image_sizes=[[SIZE, SIZE]] * 2).image_tokens)  # 4-frame still clip
        assert ids.shape == (2, 4, 4) and torch.equal(ids, theirs)
        assert torch.equal(tok.decode(ids), emu3.decode(theirs))  # first frame of the decoded clip
    assert tok.decode(ids).shape == (2, 3, SIZE, SIZE)
    wide = torch.rand(1, 3, SIZE, 2 * SIZE) * 2 - 1
    assert tok.encode(wide).shape == (1, 4, 8) and tok.decode(tok.encode(wide)).shape == (1, 3, SIZE, 2 * SIZE)


def test_janus_assigns_ids_by_cosine_similarity_and_decodes_any_grid(vqs, pixels):
    janus = vqs["janus"]
    tok = PretrainedVQTokenizer.from_vq_model(janus)
    ids = tok.encode(pixels)
    with torch.no_grad():
        latents = F.normalize(janus.quant_conv(janus.encoder(pixels)), dim=1)  # (2, D, 4, 4)
        codes = F.normalize(janus.quantize.embedding.weight, dim=-1)  # (K, D)
        expected = torch.einsum("bdhw,kd->bhwk", latents, codes).argmax(-1)  # the released LlamaGen VQ's rule
        assert torch.equal(ids, expected)
        assert torch.allclose(tok.decode(ids), janus.decode(ids.view(2, -1)), atol=1e-6)
        wide = torch.randint(0, 64, (1, 4, 8))
        assert tok.decode(wide).shape == (1, 3, SIZE, 2 * SIZE)  # transformers' decode takes only num_patches^2 ids
        with pytest.raises(ValueError):
            janus.decode(wide.view(1, -1))


def test_chameleon_encodes_like_transformers_but_cannot_decode(vqs, pixels):
    chameleon = vqs["chameleon"]
    tok = PretrainedVQTokenizer.from_vq_model(chameleon)
    ids = tok.encode(pixels)
    with torch.no_grad():
        assert torch.equal(ids, chameleon.encode(pixels).image_tokens.view(2, 4, 4))
    with pytest.raises(NotImplementedError, match="released only its encoder"):
        tok.decode(ids)
    out = tok(pixels)
    assert out.reconstruction is None and torch.equal(out.image_ids, ids)


@pytest.mark.parametrize("family", sorted(TINY))
def test_save_load_keeps_the_fingerprint(vqs, pixels, family, tmp_path):
    tok = PretrainedVQTokenizer.from_vq_model(vqs[family])
    tok.save_pretrained(tmp_path / "wrapped")
    vqs[family].save_pretrained(tmp_path / "bare")
    for path in ("wrapped", "bare"):
        loaded = load_visual_tokenizer(tmp_path / path)
        assert isinstance(loaded, PretrainedVQTokenizer) and loaded.config.family == family
        assert loaded.fingerprint() == tok.fingerprint()
        assert torch.equal(loaded.encode(pixels), tok.encode(pixels))
    assert isinstance(AutoModel.from_pretrained(tmp_path / "wrapped"), PretrainedVQTokenizer)
    assert PretrainedVQTokenizer.from_vq_model(tiny_vq(family, seed=1)).fingerprint() != tok.fingerprint()


def test_vq_weights_are_read_from_a_whole_chameleon_checkpoint(tmp_path):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(0)
    vocabulary_map = {"<image>": 3, **{f"IMGIMG{chr(65 + i)}Z": 10 + i for i in range(64)}}
    config = ChameleonConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, vq_config=TINY["chameleon"],
                             vocabulary_map=vocabulary_map)
    whole = ChameleonForConditionalGeneration(config)
    whole.save_pretrained(tmp_path)
    tok = load_visual_tokenizer(tmp_path)  # only the model.vqmodel.* tensors are read
    assert tok.fingerprint() == PretrainedVQTokenizer.from_vq_model(whole.model.vqmodel).fingerprint()


def test_load_visual_tokenizer_dispatches_on_model_type(tmp_path):
    quantizer = {"type": "vq", "codebook_size": 32}
    ours = VisualTokenizer(VisualTokenizerConfig(base_channels=16, latent_dim=16, quantizer=quantizer, downsample=8))
    ours.save_pretrained(tmp_path / "ours")
    assert isinstance(load_visual_tokenizer(tmp_path / "ours"), VisualTokenizer)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="'llama' model, not a visual tokenizer"):
        load_visual_tokenizer(tmp_path / "llm")


def test_clear_errors(vqs):
    tok = PretrainedVQTokenizer.from_vq_model(vqs["emu3"])
    with pytest.raises(ValueError, match="multiple of downsample=4"):
        tok.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"lie in \[0, 64\)"):
        tok.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="integers of shape"):
        tok.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="family must be one of"):
        PretrainedVQConfig(family="dalle")
