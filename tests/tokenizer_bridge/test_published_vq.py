"""The published tokenizers (IBQ, Open-MAGVIT2, LlamaGen VQ): presets, conversion of checkpoints saved the way the
original trainers save them, the visual-tokenizer interface, safe unpickling, and bridging the factorized layout."""

from __future__ import annotations

import argparse
import datetime
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from mllm.cli import main as vtok
from mllm.generation.logits import generate_images
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import (
    ImageLayout,
    PublishedVQConfig,
    PublishedVQTokenizer,
    bridge_llm,
)
from tokenizer_bridge.configuration_published_vq import PRESETS
from tokenizer_bridge.evaluation.run import fit_to_tokenizer, round_trip
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.interface import image_vocab_layout, load_visual_tokenizer
from tokenizer_bridge.metrics import psnr
from tokenizer_bridge.published_checkpoints import (
    CheckpointKeyError,
    UnsafeCheckpointError,
    convert_checkpoint,
    infer_config,
    load_checkpoint,
)

SIZE = 32  # px; three levels -> downsample 4 -> 8x8 ids
TINY = {
    "ibq": dict(family="ibq", ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8], resolution=32,
                z_channels=16, embed_dim=8, codebook_size=64),
    "llamagen": dict(family="llamagen", ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16, embed_dim=8,
                     codebook_size=64, attn_resolutions=[]),
    "open_magvit2": dict(family="open_magvit2", ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=10,
                         embed_dim=10, codebook_size=2**10, factorized_bits=[4, 6], attn_resolutions=[]),
}
CLI_NAME = {"ibq": "ibq", "llamagen": "llamagen", "open_magvit2": "open-magvit2"}
# Keys of the originals' own modules (SEED-Voken / LlamaGen) that pin each layout.
ORIGINAL_KEYS = {
    "ibq": ["encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
            "encoder.down.2.attn.1.proj_out.weight", "encoder.down.0.downsample.conv.weight",
            "encoder.mid.attn_1.q.weight", "decoder.up.2.attn.2.k.bias", "decoder.up.1.upsample.conv.weight",
            "decoder.up.0.block.2.conv2.weight", "quantize.embedding.weight", "quant_conv.weight"],
    "llamagen": ["encoder.conv_blocks.0.res.0.conv1.weight", "encoder.conv_blocks.2.attn.0.v.weight",
                 "encoder.mid.1.proj_out.weight", "decoder.conv_blocks.0.attn.1.norm.weight",
                 "decoder.conv_blocks.1.upsample.conv.weight", "decoder.mid.2.norm2.bias",
                 "quantize.codebook_used", "post_quant_conv.bias"],
    "open_magvit2": ["encoder.conv_in.weight", "encoder.down.0.downsample.weight", "encoder.mid_block.0.conv1.weight",
                     "decoder.adaptive.2.gamma.weight", "decoder.up.1.upsample.conv1.weight",
                     "decoder.up.0.block.0.nin_shortcut.weight", "encoder.conv_out.bias"],
}
PARAMETERS = {  # counted from the original modules built with the same configurations
    "ibq-1024": 107_049_859, "ibq-8192": 108_884_867, "ibq-16384": 110_982_019, "ibq-262144": 173_896_579,
    "ibq-pretrain-16384": 110_982_019, "ibq-pretrain-262144": 173_896_579, "open-magvit2-128-L": 112_021_653,
    "open-magvit2-256-L": 115_127_829, "open-magvit2-pretrain-16384": 115_094_033,
    "open-magvit2-pretrain-262144": 115_127_829, "llamagen-ds8": 70_109_835, "llamagen-ds16": 71_883_403,
}


def tiny(family: str, seed: int = 0) -> PublishedVQTokenizer:
    torch.manual_seed(seed)
    model = PublishedVQTokenizer(PublishedVQConfig(**TINY[family]))
    with torch.no_grad():  # GroupNorm affines away from 1/0, so that a wrong mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def trainer_checkpoint(family: str, model: PublishedVQTokenizer) -> tuple[dict, dict, dict]:
    """``(checkpoint, raw weights, EMA weights)``, laid out the way the original trainer saves them."""
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.5 if k in dict(model.named_parameters()) else v.clone() for k, v in raw.items()}
    disc = {"main.0.weight": torch.randn(8, 3, 4, 4), "main.0.bias": torch.randn(8)}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    if family == "llamagen":  # tokenizer/tokenizer_image/vq_train.py
        return {"model": raw, "ema": ema, "optimizer": opt, "discriminator": disc, "optimizer_disc": opt,
                "steps": 1000, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=64)}, raw, ema
    state = dict(raw)  # Lightning: generator, loss module and LitEma buffers in one state_dict
    state.update({f"loss.discriminator.{k}": v for k, v in disc.items()})
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    state.update({f"model_ema.{k.replace('.', '')}": ema[k] for k, _ in model.named_parameters()})
    state.update({f"model_ema.lossdiscriminator{k.replace('.', '')}": v for k, v in disc.items()})
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.999), torch.tensor(-1, dtype=torch.int)
    checkpoint = {"epoch": 3, "global_step": 5000, "pytorch-lightning_version": "2.2.1", "state_dict": state,
                  "optimizer_states": [opt, opt], "lr_schedulers": [],
                  "callbacks": {"ModelCheckpoint{'monitor': None}": {"dirpath": "/ckpt", "best_model_score": None}}}
    return checkpoint, raw, ema


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.rand(2, 3, SIZE, SIZE) * 2 - 1


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_the_published_parameter_counts(name):
    config = PublishedVQConfig.from_preset(name)
    with torch.device("meta"):
        model = PublishedVQTokenizer(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert config.grid_size(256, 256) == ((32, 32) if name in ("open-magvit2-128-L", "llamagen-ds8") else (16, 16))


def test_preset_fields():
    assert PublishedVQConfig.from_preset("open-magvit2-256-L").factors == [2**6, 2**12]
    assert PublishedVQConfig.from_preset("ibq-262144").codebook_size == 2**18
    with pytest.raises(ValueError, match="unknown preset"):
        PublishedVQConfig.from_preset("ibq-12")
    with pytest.raises(ValueError, match="2\\*\\*z_channels"):
        PublishedVQConfig(family="open_magvit2", z_channels=10, embed_dim=10, codebook_size=1000)


# ---------------------------------------------------------------------- conversion
@pytest.mark.parametrize("family", sorted(TINY))
def test_original_key_layout(family):
    keys = set(tiny(family).state_dict())
    assert set(ORIGINAL_KEYS[family]) <= keys


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("use_ema", [True, False])
def test_trainer_checkpoint_converts_and_loads(family, use_ema, tmp_path, capsys):
    checkpoint, raw, ema = trainer_checkpoint(family, tiny(family))
    torch.save(checkpoint, tmp_path / "original.ckpt")
    argv = [CLI_NAME[family], "--checkpoint", str(tmp_path / "original.ckpt"), "--out", str(tmp_path / "out")]
    vtok(["convert", *argv, *([] if use_ema else ["--no-ema"])])
    printed = capsys.readouterr().out
    assert "inferred architecture" in printed and f"codebook_size={TINY[family]['codebook_size']}" in printed
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded = load_visual_tokenizer(tmp_path / "out")
    assert isinstance(loaded, PublishedVQTokenizer) and isinstance(AutoModel.from_pretrained(tmp_path / "out"),
                                                                   PublishedVQTokenizer)
    expected = ema if use_ema else raw
    state = loaded.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family", sorted(TINY))
def test_inferred_architecture_is_the_original(family):
    inferred = infer_config(family, tiny(family).state_dict())
    for key, value in TINY[family].items():
        if key != "factorized_bits" and not (family == "ibq" and key in ("attn_resolutions", "resolution")):
            assert getattr(inferred, key) == value, key
    if family == "open_magvit2":  # the AR models' bit split is no property of the weights: [6, 12] for 2^18 only
        assert inferred.factorized_bits is None
    if family == "ibq":  # attention at the deepest level: side 256 / 4 at resolution 256, as 8 at 32
        assert (inferred.resolution, inferred.attn_resolutions) == (256, [64])


def test_yaml_config_of_the_original(tmp_path):
    t = TINY["ibq"]
    ddconfig = dict(double_z=False, z_channels=t["z_channels"], resolution=t["resolution"], in_channels=3, out_ch=3,
                    ch=t["ch"], ch_mult=t["ch_mult"], num_res_blocks=t["num_res_blocks"],
                    attn_resolutions=t["attn_resolutions"], dropout=0.0)
    document = {"model": {"class_path": "src.IBQ.models.ibqgan.IBQ", "init_args": {
        "ddconfig": ddconfig, "lossconfig": {"target": "x"}, "n_embed": t["codebook_size"],
        "embed_dim": t["embed_dim"], "l2_normalize": False, "use_ema": True}}}
    (tmp_path / "ibq.yaml").write_text(yaml.safe_dump(document))
    model = tiny("ibq")
    torch.save(trainer_checkpoint("ibq", model)[0], tmp_path / "ibq.ckpt")
    converted = convert_checkpoint("ibq", tmp_path / "ibq.ckpt", config=tmp_path / "ibq.yaml", log=lambda _: None)
    assert converted.config.attn_resolutions == [8] and converted.config.resolution == 32


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = tiny("ibq").state_dict()
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointKeyError, match="decoder.conv_out.bias.*decoder.extra.weight"):
        convert_checkpoint("ibq", tmp_path / "bad.ckpt", config=PublishedVQConfig(**TINY["ibq"]), log=lambda _: None)
    with pytest.raises(SystemExit, match="missing keys"):
        vtok(["convert", "ibq", "--checkpoint", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this runs ``os.makedirs(path)``: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_pickle_outside_the_allow_list_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "was_run"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="os.makedirs.*--trust-pickle"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(SystemExit, match="--trust-pickle"):
        vtok(["convert", "ibq", "--checkpoint", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "o")])
    assert not marker.exists()


def test_trust_pickle_loads_a_trusted_file(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "saved": datetime.date(2024, 6, 1)}, tmp_path / "c.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="datetime.date"):
        load_checkpoint(tmp_path / "c.ckpt")
    assert load_checkpoint(tmp_path / "c.ckpt", trust_pickle=True)["saved"] == datetime.date(2024, 6, 1)


# ---------------------------------------------------------------------- the visual-tokenizer interface
@pytest.mark.parametrize("family", sorted(TINY))
def test_encode_decode_shapes_and_ids(family, pixels):
    model = tiny(family)
    ids = model.encode(pixels)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < model.codebook_size
    assert model.decode(ids).shape == (2, 3, SIZE, SIZE)
    assert model.encode(torch.rand(1, 3, SIZE, 2 * SIZE) * 2 - 1).shape == (1, 8, 16)
    assert (model.num_levels, model.shared_codebook, model.id_layout, model.config.downsample) == (1, False, "grid", 4)
    assert image_vocab_layout(model, SIZE) == dict(codebook_size=model.codebook_size, num_levels=1, layout="grid",
                                                   grid_size=(8, 8))
    with pytest.raises(ValueError, match="multiple of downsample"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(torch.full((1, 2, 2), model.codebook_size))


def test_quantizer_rules(pixels):
    ibq = tiny("ibq")
    latents = ibq.encode_latents(pixels)  # (B, D, h, w)
    logits = torch.einsum("bdhw,nd->bnhw", latents, ibq.quantize.embedding.weight)
    assert torch.equal(ibq.encode(pixels), logits.argmax(1))  # IBQ: largest dot product, no normalisation
    lfq = tiny("open_magvit2")
    latents = lfq.encode_latents(pixels)
    bits = (latents > 0).long()  # (B, 10, h, w): channel i = bit i
    assert torch.equal(lfq.encode(pixels), sum(bits[:, i] << i for i in range(10)))
    assert torch.equal(lfq.quantize.codes(lfq.encode(pixels)), bits.float() * 2 - 1)
    llamagen = tiny("llamagen")
    latents = torch.nn.functional.normalize(llamagen.encode_latents(pixels), dim=1)
    codes = torch.nn.functional.normalize(llamagen.quantize.embedding.weight, dim=1)
    assert torch.equal(llamagen.encode(pixels), torch.einsum("bdhw,nd->bnhw", latents, codes).argmax(1))


@pytest.mark.parametrize("family", sorted(TINY))
def test_save_load_round_trip_is_identical(family, pixels, tmp_path):
    model = tiny(family)
    model.save_pretrained(tmp_path)
    loaded = load_visual_tokenizer(tmp_path)
    assert loaded.fingerprint() == model.fingerprint()
    assert torch.equal(loaded.encode(pixels), model.encode(pixels))
    ids = model.encode(pixels)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert tiny(family, seed=5).fingerprint() != model.fingerprint()


# ---------------------------------------------------------------------- bridging
def test_factorized_open_magvit2_layout_bridges_and_generates_well_formed_spans(pixels):
    tok = tiny("open_magvit2")
    assert tok.config.factors == [2**4, 2**6]  # factorized_bits [4, 6]: sub-token 0 = the 4 low bits
    tokenizer = build_word_tokenizer(["a red circle draw on the left"])
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=512)).eval()
    layout = ImageLayout(**image_vocab_layout(tok, SIZE), factors=tok.config.factors)
    vocab = bridge_llm(llm, tokenizer, layout, visual_tokenizer=tok)
    ids = tok.encode(pixels)
    span = vocab.build_span(ids[0])
    assert len(span) == vocab.span_length == 2 + 8 * (8 * 2 + 1)  # two sub-tokens per position, <eol> per row
    assert span[1] - vocab.offset == ids[0, 0, 0] % 16 and span[2] - vocab.offset - 16 == ids[0, 0, 0] // 16
    assert torch.equal(vocab.parse_span(span), ids[0])
    generated = generate_images(llm, tokenizer, vocab, ["a red circle", "draw"], do_sample=True, top_k=0)
    assert generated.shape == (2, 8, 8) and int(generated.min()) >= 0 and int(generated.max()) < tok.codebook_size
    assert tok.decode(generated).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("family", ["ibq", "open_magvit2"])
def test_vtok_eval_tokenizer_evaluates_a_converted_folder(family, tmp_path):
    from mllm.cli import main as vtok

    model = tiny(family)
    model.save_pretrained(tmp_path / "converted")
    picture = Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8))
    (tmp_path / "mine").mkdir()
    picture.save(tmp_path / "mine" / "a.png")
    vtok(["eval", "tokenizer", "--model", str(tmp_path / "converted"), "--out", str(tmp_path / "report"),
          "--suites", "reconstruction", "codebook", "--images", str(tmp_path / "mine"), "--max-side", "0"])
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["config"]["model_type"] == "published_vq_tokenizer" and results["config"]["family"] == family
    assert results["codebook_size"] == model.codebook_size and results["codebook"]["bpp"] > 0
    pixel_values = to_pixel_values(fit_to_tokenizer(picture, model.config.downsample))
    _, reconstruction = round_trip(model, pixel_values)  # what the converted weights do, not a fresh model's
    assert results["reconstruction"]["psnr"] == pytest.approx(float(psnr(reconstruction, pixel_values)[0]), abs=1e-3)
