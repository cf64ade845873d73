"""Visual-tokenizer configs written before the quantizer became one nested section still load and build the same
model, with the same fingerprint (bundles store it and refuse a tokenizer whose fingerprint changed).

Fixtures: ``tests/fixtures/compat_857d9dc/visual_tokenizers/*/`` (config.json written by the code at 857d9dc, and
``expected.json``: state-dict keys and shapes, codebook size and fingerprint under the deterministic weights of
``fill``, copied from ``written_by.py.txt``). Also: the uniform properties of every visual-tokenizer class.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

# importing tokenizer_bridge registers its configs and models with AutoConfig / AutoModel
from tokenizer_bridge import SlotTokenizer, SlotTokenizerConfig, VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.configuration_visual_tokenizer import LEGACY_FIELDS, legacy_config_dict
from tokenizer_bridge.modeling_pretrained_vq import FAMILIES, PretrainedVQTokenizer
from tokenizer_bridge.nn import ENCODERS, ConvEncoder
from tokenizer_bridge.quantizers import QUANTIZERS, VectorQuantizer

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "compat_857d9dc"
FOLDERS = sorted((ROOT / "visual_tokenizers").iterdir())
CLASSES = {"visual_tokenizer": (VisualTokenizerConfig, VisualTokenizer), "slot_tokenizer": (SlotTokenizerConfig,
                                                                                           SlotTokenizer)}


# Copied verbatim from tests/fixtures/compat_857d9dc/written_by.py.txt: the weights the fingerprints were taken with.
def fill(model):
    sd = model.state_dict()
    new = {}
    for i, (k, v) in enumerate(sorted(sd.items())):
        if v.is_floating_point():
            new[k] = (torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape) * 0.001 + i * 0.01).sin().to(v.dtype)
        else:
            new[k] = v
    model.load_state_dict(new)
    return model


def built(config):
    torch.manual_seed(0)
    return fill(AutoModel.from_config(config)).eval()


def shapes(model) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def expected(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


def classes(folder: Path):
    return CLASSES[json.loads((folder / "config.json").read_text())["model_type"]]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_a_config_written_by_857d9dc_builds_the_recorded_model_and_fingerprint(folder):
    config_class, model_class = classes(folder)
    for config in (AutoConfig.from_pretrained(folder), config_class.from_pretrained(folder)):
        assert type(config) is config_class and isinstance(config.quantizer, dict)
        model = built(config)
        assert type(model) is model_class
        assert shapes(model) == expected(folder)["state_dict"]
        assert model.codebook_size == config.codebook_size == expected(folder)["codebook_size"]
        assert model.fingerprint() == expected(folder)["fingerprint"]
        if "image_ids_shape_32px" in expected(folder):
            ids = model.encode(torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32))
            assert list(ids.shape) == expected(folder)["image_ids_shape_32px"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_a_config_saved_again_is_nested_and_reloads_to_the_same_model(folder, tmp_path):
    config_class, _ = classes(folder)
    config_class.from_pretrained(folder).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantizer"]["type"] in QUANTIZERS and not set(saved) & set(LEGACY_FIELDS)
    model = built(AutoConfig.from_pretrained(tmp_path))
    assert shapes(model) == expected(folder)["state_dict"]
    assert model.fingerprint() == expected(folder)["fingerprint"]


def test_the_conv_vq_fixture_becomes_a_two_key_section():
    config = VisualTokenizerConfig.from_pretrained(ROOT / "visual_tokenizers" / "conv_vq")
    assert config.quantizer == {"type": "vq", "codebook_size": 64}  # its flat fields at their defaults add nothing
    residual = VisualTokenizerConfig.from_pretrained(ROOT / "visual_tokenizers" / "conv_residual")
    assert residual.quantizer == {"type": "vq", "codebook_size": 32, "num_levels": 3, "shared_codebook": True,
                                  "quantizer_dropout": 0.1}
    fsq = VisualTokenizerConfig.from_pretrained(ROOT / "visual_tokenizers" / "vit_fsq")
    assert fsq.quantizer == {"type": "fsq", "levels": [8, 5, 5]}  # its saved codebook_size was derived


def test_legacy_config_dict_gives_back_the_flat_fields_of_857d9dc():
    """What the fingerprint hashes: the fixture's own config.json values, whatever the new form."""
    for folder in FOLDERS:
        written = json.loads((folder / "config.json").read_text())
        config_class, _ = classes(folder)
        flat = legacy_config_dict(config_class.from_pretrained(folder))
        quantizer_fields = {"quantizer", *LEGACY_FIELDS} - (set() if written["quantizer"] == "vq" else
                                                            {"distance", "codebook_update", "commitment_weight",
                                                             "codebook_weight", "ema_decay", "kmeans_init",
                                                             "kmeans_iters", "dead_code_threshold"})
        assert {k: flat[k] for k in quantizer_fields} == {k: written[k] for k in quantizer_fields}, folder.name


# ---------------------------------------------------------------------------------------------------- flat keys
# Flat keyword arguments as earlier versions took them, and fingerprints (after fill) computed by the code at d24af47,
# the last version with flat fields; several give VQ-only fields to another quantizer, which it ignored but hashed.
LEGACY_CASES = {
    "ibq_ignored_vq_fields": (
        VisualTokenizer, dict(base_channels=16, latent_dim=8, codebook_size=32, downsample=8, quantizer="ibq",
                              codebook_update="ema", ema_decay=0.95, dead_code_threshold=0.01),
        "d0c17beec9c04c17abd1e0ec49a3cb8827572fa781bac201b3e00f0bedee641a"),
    "fsq_ignored_size_and_distance": (
        VisualTokenizer, dict(base_channels=16, latent_dim=4, downsample=8, quantizer="fsq",
                              quantizer_options={"levels": [4, 4]}, codebook_size=512, distance="cosine"),
        "eceb69fbd00ea80f54a00320c8c34b851f9f59e8abeaac3673928e4d26af00e0"),
    "vq_explicit_default_option": (
        VisualTokenizer, dict(base_channels=16, latent_dim=8, codebook_size=32, downsample=8,
                              quantizer_options={"rotation_trick": False}),
        "89c20dd04a4d437f54c0ce86531e0e4b1d7441ceee754c5a278be675de2508f2"),
    "vq_one_level_shared": (
        VisualTokenizer, dict(base_channels=16, latent_dim=8, codebook_size=32, downsample=8, shared_codebook=True,
                              quantizer_dropout=0.2),
        "9aa9dce52ba687cbbff078658a1e5c9eb80197a179bfa6fbb2843936dca69018"),
    "ibq_options_and_ignored_weight": (
        VisualTokenizer, dict(base_channels=16, latent_dim=8, codebook_size=32, downsample=8, quantizer="ibq",
                              quantizer_options={"commitment_weight": 0.5}, commitment_weight=0.25,
                              codebook_weight=2.0),
        "a1bff556719d813bee3afc3d14f23549103d94cd7bf17264807f28fb22286369"),
    "lfq_options_residual": (
        VisualTokenizer, dict(base_channels=16, latent_dim=6, downsample=8, quantizer="lfq",
                              quantizer_options={"bits": 4, "spherical": True}, residual_levels=2, quantizer_dropout=0),
        "8e1a8bd0006ec99c88dc4c9cd7c8914d2b960f8b81103c6704b28bb67ee8bb60"),
    "slot_one_level": (
        SlotTokenizer, dict(base_channels=8, backbone_dim=16, latent_dim=8, num_slots=4, codebook_size=16,
                            residual_levels=1, decoder="broadcast", image_size=32, num_heads=2),
        "139f8ec3b41af0eac22c71ec5a1f14d184a6b78c953b47e2b302feff7d0b8eb5"),
    "slot_fsq_three_levels": (
        SlotTokenizer, dict(base_channels=8, backbone_dim=16, latent_dim=8, num_slots=4, quantizer="fsq",
                            quantizer_options={"levels": [5, 5]}, residual_levels=3, shared_codebook=True,
                            decoder="broadcast", image_size=32, num_heads=2, distance="cosine"),
        "5c87b83ade44cc5fd3f8f9d2833ef10304664fa362ea8c8b1a3f4f15a34ad746"),
}


@pytest.mark.parametrize("name", sorted(LEGACY_CASES))
def test_flat_keyword_arguments_keep_the_fingerprint_of_the_flat_version(name, tmp_path):
    model_class, flat, fingerprint = LEGACY_CASES[name]
    model = built(model_class.config_class(**flat))
    assert model.fingerprint() == fingerprint
    model.config.save_pretrained(tmp_path)  # ignored fields stay in the saved config, beside the section
    assert built(AutoConfig.from_pretrained(tmp_path)).fingerprint() == fingerprint


FLAT_AND_NESTED = [
    (VisualTokenizerConfig, dict(codebook_size=64, distance="cosine", quantizer_options={"lookup_dim": 4}),
     dict(quantizer={"type": "vq", "codebook_size": 64, "distance": "cosine", "lookup_dim": 4})),
    (VisualTokenizerConfig, dict(quantizer="fsq", quantizer_options={"levels": [5, 5]}, residual_levels=2,
                                 quantizer_dropout=0.5),
     dict(quantizer={"type": "fsq", "levels": [5, 5], "num_levels": 2, "quantizer_dropout": 0.5})),
    (VisualTokenizerConfig, dict(quantizer="ibq", codebook_size=16, quantizer_options={"entropy_weight": 0.2}),
     dict(quantizer={"type": "ibq", "codebook_size": 16, "entropy_weight": 0.2})),
    (SlotTokenizerConfig, dict(codebook_size=16), dict(quantizer={"type": "vq", "codebook_size": 16, "num_levels": 2})),
    (SlotTokenizerConfig, dict(quantizer="lfq", quantizer_options={"bits": 4}, residual_levels=1),
     dict(quantizer={"type": "lfq", "bits": 4})),
]


@pytest.mark.parametrize("config_class,flat,nested", FLAT_AND_NESTED)
def test_a_flat_config_and_its_nested_equivalent_build_the_same_model(config_class, flat, nested):
    arch = dict(base_channels=8, latent_dim=8, downsample=8, image_size=32)
    if config_class is SlotTokenizerConfig:
        arch.update(backbone_dim=16, num_slots=4, decoder="broadcast", num_heads=2, downsample=4)
    a, b = config_class(**arch, **flat), config_class(**arch, **nested)
    assert a.to_dict() == b.to_dict()
    initialised = []
    for config in (a, b):
        torch.manual_seed(0)
        initialised.append(AutoModel.from_config(config).state_dict())
    assert initialised[0].keys() == initialised[1].keys()
    assert all(torch.equal(v, initialised[1][k]) for k, v in initialised[0].items())
    assert built(a).fingerprint() == built(b).fingerprint()


def test_flat_fields_apply_on_top_of_a_nested_section():
    """What an override of an older recipe (``model.codebook_size=16``) does to a nested recipe."""
    config = VisualTokenizerConfig(quantizer={"type": "vq", "codebook_size": 256, "distance": "cosine"},
                                   codebook_size=16, codebook_update="ema", distance="euclidean")
    assert config.quantizer == {"type": "vq", "codebook_size": 16, "codebook_update": "ema"}
    fsq = VisualTokenizerConfig(quantizer={"type": "fsq", "levels": [8, 8]}, quantizer_options={"levels": [4, 4]})
    assert fsq.quantizer == {"type": "fsq", "levels": [4, 4]} and fsq.codebook_size == 16


# Fingerprints (after fill) of the recipes' tokenizers, computed by the code at d24af47 (demo_tokenizer: recomputed
# when its ViTs got attention_radius, when it got label_weight, when that went from 0.1 to 0.03, and when its decoder
# went back to depth 2).
# deliberate changes of a repository recipe since 857d9dc, applied to the old copy (issue 17: a deeper demo decoder,
# then local attention in both ViTs, which changes the config and so the fingerprint, not the parameters; then the
# label head's weight (0.1, then 0.03), a config value too: its label_classes, and so its parameters, come from
# data.labels; then stage 1's decoder at depth 2 again, the demo's decoder stage growing it to 4)
CHANGED_SINCE = {"demo_tokenizer": ["model.decoder_options={width: 96, depth: 2, num_heads: 2, attention_radius: 3}",
                                    "model.encoder_options={width: 64, depth: 2, num_heads: 2, attention_radius: 3}",
                                    "model.label_weight=0.03"]}
RECIPE_FINGERPRINTS = {"demo_tokenizer": "5944da3c3850ce1734484805fd46535591483cf5f3440dada7974921985624fc",
                       "tokenizer_conv_vq": "17da0ca8249d62c8818a91bb14bb971cb532df83731e572f7bbaad485a92cd5b"}


@pytest.mark.parametrize("stem", sorted(RECIPE_FINGERPRINTS))
def test_the_repository_recipes_build_the_model_of_their_857d9dc_copies(stem):
    from mllm.training.recipe import load_recipe
    from mllm.training.stages.tokenizer import build_tokenizer_model

    models = []
    for path, extra in ((ROOT / "recipes" / f"{stem}.yaml", CHANGED_SINCE.get(stem, [])),
                        (Path(__file__).resolve().parents[2] / "recipes" / f"{stem}.yaml", [])):
        recipe = load_recipe(path, extra)
        torch.manual_seed(0)
        models.append(fill(build_tokenizer_model(recipe.model, recipe.data.image_size)))
    old, new = models
    assert shapes(old) == shapes(new) and old.fingerprint() == new.fingerprint() == RECIPE_FINGERPRINTS[stem]


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("quantizer,match", [
    ({"type": "vq", "codebook_size": 8, "codebok_update": "ema"}, r"unknown key\(s\) \['codebok_update'\]"),
    ({"type": "vq", "codebook_size": 8, "dim": 4}, "dim is the model's latent_dim"),
    ({"type": "fsq", "levels": [4, 4], "codebook_size": 16}, r"unknown key\(s\) \['codebook_size'\]"),
    ({"type": "vq"}, r"needs \['codebook_size'\]"),
    ({"type": "vq", "codebook_size": "8"}, "quantizer.codebook_size"),
    ({"type": "vq", "codebook_size": 8, "num_levels": 0}, "num_levels"),
    ({"type": "pq", "codebook_size": 8}, r"one of \['fsq', 'ibq', 'lfq', 'vq'\]"),
    ({"codebook_size": 8}, "type"),
])
def test_a_bad_section_fails_with_a_clear_error(quantizer, match):
    with pytest.raises(ValueError, match=match):
        VisualTokenizerConfig(quantizer=quantizer)


def test_an_integer_where_a_float_is_declared_is_accepted():
    assert VisualTokenizerConfig(quantizer={"type": "vq", "codebook_size": 8, "commitment_weight": 1}).quantizer[
        "commitment_weight"] == 1


def test_names_are_the_keys_of_the_dicts_that_build_them(monkeypatch):
    with pytest.raises(ValueError, match="encoder must be one of"):
        VisualTokenizerConfig(encoder="resnet")
    monkeypatch.setitem(ENCODERS, "resnet", ConvEncoder)
    monkeypatch.setitem(QUANTIZERS, "vq2", VectorQuantizer)
    config = VisualTokenizerConfig(encoder="resnet", quantizer={"type": "vq2", "codebook_size": 8},
                                   base_channels=8, latent_dim=8)
    assert isinstance(VisualTokenizer(config).quantizer, VectorQuantizer)


def test_get_text_config_is_the_config_itself_not_its_decoder_name():
    for config in (VisualTokenizerConfig(), SlotTokenizerConfig(), AutoConfig.from_pretrained(FOLDERS[0])):
        assert config.get_text_config() is config and config.get_text_config(decoder=True) is config


# ---------------------------------------------------------------------------------------------------- interface
INTERFACE = ("codebook_size", "num_levels", "shared_codebook", "id_layout")


def interface(tokenizer) -> tuple:
    return tuple(getattr(tokenizer, name) for name in INTERFACE)


def test_every_visual_tokenizer_class_exposes_the_same_read_only_properties():
    vq = dict(base_channels=8, latent_dim=8, downsample=8)
    plain = VisualTokenizer(VisualTokenizerConfig(**vq, quantizer={"type": "vq", "codebook_size": 16}))
    shared = VisualTokenizer(VisualTokenizerConfig(**vq, quantizer={"type": "vq", "codebook_size": 16,
                                                                    "num_levels": 3, "shared_codebook": True}))
    slot = SlotTokenizer(SlotTokenizerConfig(base_channels=8, backbone_dim=16, latent_dim=8, num_slots=8,
                                             slot_budgets=[8, 2, 4], decoder="broadcast", num_heads=2,
                                             quantizer={"type": "fsq", "levels": [4, 4], "num_levels": 2}))
    family = FAMILIES["emu3"]  # a tiny random Emu3 VQ, as tests/tokenizer_bridge/test_modeling_pretrained_vq.py builds it
    emu3 = family.model_class()(family.config_class()(
        codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1],
        num_res_blocks=1, attn_resolutions=[], hidden_size=32)).eval()
    wrapped = PretrainedVQTokenizer.from_vq_model(emu3)
    assert interface(plain) == (16, 1, False, "grid")
    assert interface(shared) == (16, 3, True, "grid")
    assert interface(slot) == (16, 2, False, "sequence") and slot.budgets == (2, 4, 8)
    assert interface(wrapped) == (64, 1, False, "grid")
    assert slot.encode(torch.zeros(1, 3, 32, 32)).shape == (1, slot.budgets[-1], slot.num_levels)
    for tokenizer in (plain, shared, slot, wrapped):
        for name in INTERFACE:
            with pytest.raises(AttributeError):
                setattr(tokenizer, name, None)
    with pytest.raises(AttributeError):
        slot.budgets = (1,)
