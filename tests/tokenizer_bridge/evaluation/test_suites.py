"""Evaluation suites on a tiny random tokenizer: expected keys with finite values, codec rate matching, text scored
against ground truth, clear errors, and ``vtok eval tokenizer|bundle`` end to end (results.json/.md + figures).

Tests that call the Tesseract binary are marked ``ocr``; everything else runs without it.
"""

import json
import math

import pytest
import torch
from PIL import Image

from mllm.cli import main as vtok
from mllm.data import photos
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.evaluation.codecs import compress, match_quality
from tokenizer_bridge.evaluation.patterns import (
    GRATING_FREQUENCIES,
    TEXT_SAMPLES,
    format_parameter,
    render_text,
)
from tokenizer_bridge.evaluation.run import fit_to_tokenizer
from tokenizer_bridge.evaluation.suites import evaluate_tokenizer, tiles
from tokenizer_bridge.evaluation.suites import ocr as ocr_module
from tokenizer_bridge.metrics import HFBackboneFeatures

FAST = dict(images=photos.load_photos(["chelsea"]), max_side=96, detail_size=64, text_fonts=("DejaVuSans.ttf",), text_sizes=(24,),
            text_languages=("en", "de"), alignment_crops=48, batch_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8)
    return VisualTokenizer(config).eval()


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(path)
    return path


def _finite(values):
    for value in values:
        if isinstance(value, dict):
            _finite(value.values())
        elif isinstance(value, float):
            assert math.isfinite(value), value


# --------------------------------------------------------------------------------------------- image handling
def test_fit_to_tokenizer_caps_the_long_side_and_crops_to_the_downsample():
    image = Image.new("RGB", (1000, 603))
    assert fit_to_tokenizer(image, 16, 512).size == (512, 304)  # 512 x 309 -> crop to multiples of 16
    assert fit_to_tokenizer(image, 8).size == (1000, 600)  # native resolution when uncapped
    with pytest.raises(ValueError, match="smaller than"):
        fit_to_tokenizer(Image.new("RGB", (7, 40)), 8)


def test_tiles_cover_the_image_without_overlap():
    pixels = torch.arange(3 * 70 * 64, dtype=torch.float32).view(1, 3, 70, 64)
    out = tiles(pixels, 32)
    assert out.shape == (4, 3, 32, 32)
    assert torch.equal(out[1], pixels[0, :, 3:35, 32:64])  # centred grid: 70 -> rows 3..67


# ----------------------------------------------------------------------------------------------------- codecs
def test_codec_matching_hits_the_target_bpp():
    image = fit_to_tokenizer(photos.load_photo("astronaut"), 8, 128)
    for codec in ("jpeg", "webp"):
        match = match_quality(image, codec, 1.0)
        assert match["matched"] and 0.8 < match["bpp"] <= 1.0
        better = compress(image, codec, match["quality"] + 1)[0]
        assert better > 1.0 or match["quality"] == 95  # the next quality would overshoot: the match is tight
    unreachable = match_quality(image, "jpeg", 0.001)
    assert not unreachable["matched"] and unreachable["quality"] == 1 and unreachable["bpp"] > 0.001


# ----------------------------------------------------------------------------------------------------- suites
def test_reconstruction_detail_and_codebook_suites(tokenizer):
    result = evaluate_tokenizer(tokenizer, ("reconstruction", "detail", "codebook"), **FAST)
    rec = result["reconstruction"]
    assert rec["num_images"] == 1 and rec["per_image"][0]["width"] == 96 and rec["per_image"][0]["height"] == 64
    assert rec["frechet_distance"] is None and rec["lpips_like"] is None
    assert "no feature extractor weights given" in rec["feature_metrics_note"]
    assert len(rec["band_error_ratio"]) == 6 and 0 < rec["psnr"] < 60 and -1 <= rec["ssim"] <= 1

    detail = result["detail"]
    assert list(detail["grating_psnr"]) == [format_parameter("grating", f) for f in GRATING_FREQUENCIES]
    assert set(detail["grating_mtf"]) == set(detail["grating_psnr"])
    assert all(v >= 0 for v in detail["grating_mtf"].values())
    assert set(detail["glyphs_psnr"]) == {"8", "10", "12", "16", "24"} and "checkerboard_ssim" in detail

    book = result["codebook"]
    assert book["bpp"] == pytest.approx(4 / 64) and book["bits_per_token"] == 4.0  # log2(16) bits per 8x8 block
    assert 0 < book["codebook_usage"] <= 1 and 1 <= book["perplexity"] <= 16
    assert book["num_tokens"] == 12 * 8 and book["bpp_entropy"] <= book["bpp"] + 1e-9
    base = result["baselines"]
    assert base["target_bpp"] == book["bpp"] and base["tokenizer"]["psnr"] == pytest.approx(rec["psnr"])
    for codec in ("jpeg", "webp"):
        assert {"bpp", "psnr", "ssim", "quality_mean", "fraction_matched"} <= set(base[codec]["matched"])
        assert len(base[codec]["sweep"]) == 8

    assert set(result["timings"]) == {"reconstruction", "detail", "codebook"}
    assert result["codebook_size"] == result["config"]["quantizer"]["codebook_size"] == 16 and result["versions"]["torch"]
    assert result["num_levels"] == 1
    _finite([rec, detail, book, base])
    json.dumps(result)  # JSON-ready without the samples


def test_feature_metrics_and_alignment_with_a_local_backbone(tokenizer, tiny_vit):
    extractor = HFBackboneFeatures(tiny_vit)
    result = evaluate_tokenizer(tokenizer, ("reconstruction", "alignment"), extractor, **FAST)
    rec, align = result["reconstruction"], result["alignment"]
    assert rec["num_samples"] == 6 and rec["tile_size"] == 32 and rec["feature_dim"] == 32  # 96x64 -> 3x2 tiles
    assert rec["frechet_distance"] >= 0 and rec["lpips_like"] >= 0
    assert set(align) >= {"cknna_quantized", "cknna_latents", "se_cknna", "se_cknna_rotation", "se_cknna_scaling",
                          "se_cknna_noise"}
    assert all(-1 <= align[k] <= 1 for k in align if k.startswith(("cknna", "se_")))
    assert align["num_samples"] == 48 and result["feature_extractor"] == str(tiny_vit)
    _finite([rec, align])


def test_feature_metrics_requested_without_weights_are_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="alignment suite needs a feature extractor"):
        evaluate_tokenizer(tokenizer, ("alignment",), **FAST)
    with pytest.raises(ValueError, match="unknown or no suite"):
        evaluate_tokenizer(tokenizer, ("speed",), images=FAST["images"])
    with pytest.raises(FileNotFoundError, match="no feature-extractor weights"):
        vtok(["eval", "tokenizer", "--model", str(_saved(tokenizer, tmp_path)), "--out", str(tmp_path / "o"),
              "--features", str(tmp_path / "missing-backbone")])


def test_text_suite_scores_against_ground_truth_not_the_original_ocr(tokenizer, monkeypatch):
    """A fake OCR misreads every original and reads every reconstruction perfectly: CER must be 0 and the
    'ceiling' CER 1, which only holds when both are scored against the ground-truth strings."""
    truth = {TEXT_SAMPLES[lang][0]: TEXT_SAMPLES[lang][1] for lang in ("en", "de")}  # Tesseract language -> text
    rendered = {}

    def fake_ocr(image, language, font_px, command="tesseract"):
        key = image.tobytes()
        if key in rendered:  # an original rendering
            return "#" * len(rendered[key])
        return truth[language]

    original_render = render_text

    def recording_render(text, *args, **kwargs):
        image = original_render(text, *args, **kwargs)
        rendered[image.tobytes()] = text
        return image

    monkeypatch.setattr(ocr_module, "tesseract_path", lambda command="tesseract": "/fake/tesseract")
    monkeypatch.setattr(ocr_module, "tesseract_languages", lambda command="tesseract": frozenset({"eng", "deu"}))
    monkeypatch.setattr(ocr_module, "ocr", fake_ocr)
    monkeypatch.setattr("tokenizer_bridge.evaluation.suites.render_text", recording_render)
    text = evaluate_tokenizer(tokenizer, ("text",), **{**FAST, "text_languages": ("en", "de")})["text"]
    assert text["num_samples"] == 2 and text["cer"] == 0.0 and text["wer"] == 0.0
    assert text["cer_original"] == pytest.approx(1.0) and set(text["by_language"]) == {"en", "de"}


def test_text_suite_without_tesseract_is_skipped_with_the_setup_hint(tokenizer):
    text = evaluate_tokenizer(tokenizer, ("text",), **FAST, tesseract="no-such-tesseract-binary")["text"]
    assert text["skipped"] and "eval/setup_ocr.sh" in text["reason"]


def test_normalize_text_folds_typography_not_content():
    assert ocr_module.normalize_text("d\u2019un  c\u0153ur\nqui") == "d'un c\u0153ur qui"
    assert ocr_module.normalize_text("βδελυγ\u00b5ία") == "βδελυγμία"  # MICRO SIGN read for Greek mu
    assert ocr_module.normalize_text("Größe") == "Größe"


@pytest.mark.ocr
def test_text_suite_with_tesseract(tokenizer):
    text = evaluate_tokenizer(tokenizer, ("text",), **FAST)["text"]
    assert not text.get("skipped") and text["num_samples"] == 2
    assert text["cer_original"] < 0.1  # Tesseract reads the clean 24 px renders
    assert text["cer"] > text["cer_original"]  # a random tokenizer destroys the text
    assert {s["ocr_original"] for s in text["samples"]} and math.isfinite(text["wer"])


# ------------------------------------------------------------------------------------------------- end to end
def _saved(tokenizer, tmp_path):
    path = tmp_path / "tokenizer"
    if not path.exists():
        tokenizer.save_pretrained(path)
    return path


def test_vtok_eval_tokenizer_writes_json_markdown_and_figures(tokenizer, tmp_path, capsys):
    out = tmp_path / "report"
    vtok(["eval", "tokenizer", "--model", str(_saved(tokenizer, tmp_path)), "--out", str(out), "--suites",
          "reconstruction", "detail", "codebook", "--photos", "chelsea", "--max-side", "96", "--detail-size", "64"])
    results = json.loads((out / "results.json").read_text())
    assert results["suites"] == ["reconstruction", "detail", "codebook"] and "baselines" in results
    assert results["config"]["downsample"] == 8 and "transformers" in results["versions"]
    assert results["settings"]["images"] == ["chelsea"] and "_samples" not in results
    markdown = (out / "results.md").read_text()
    assert "## reconstruction" in markdown and "codec baselines" in markdown and "![rate_distortion.png]" in markdown
    for figure in ("rate_distortion.png", "detail.png", "worst_reconstruction.png", "worst_detail.png"):
        assert (out / figure).stat().st_size < 300_000
        assert Image.open(out / figure).width > 200
    assert "wrote" in capsys.readouterr().out


def test_vtok_eval_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no visual tokenizer at"):
        vtok(["eval", "tokenizer", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no bundle at"):
        vtok(["eval", "bundle", "--bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])


def test_vtok_eval_bundle(tokenizer, tmp_path):
    from mllm.bundle.bundle import save_bundle
    from mllm.model import bridge

    torch.manual_seed(0)
    llm = {"config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2)}
    model, processor = bridge(llm, tokenizer, 32)
    save_bundle(tmp_path / "bundle", model, processor)
    vtok(["eval", "bundle", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "report")])
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    image = results["image_tokens"]
    assert image["uniform_perplexity"] == 16 and image["num_image_tokens"] > 0
    assert 1 <= image["image_token_perplexity_within_image_ids"] <= image["image_token_perplexity"]
    text = results["text"]
    assert 1 <= text["text_perplexity_text_vocab_only"] <= text["text_perplexity"]  # renormalising only helps
    assert 0 <= text["mass_on_non_text_tokens"] <= 1 and text["base_model_text_perplexity"] is None
    assert 0 <= results["llm"]["caption_accuracy"] <= 1 and 0 <= results["llm"]["t2i_accuracy"] <= 1
    assert (tmp_path / "report" / "results.md").read_text().startswith("# Bundle evaluation")
    assert (tmp_path / "report" / "generations.png").exists()


def test_suites_take_the_images_they_are_given(tokenizer):
    # any PIL images, named or not: the evaluation never reaches for the bundled photographs by itself
    rng = torch.Generator().manual_seed(0)
    arrays = [(torch.rand(40, 56, 3, generator=rng) * 255).to(torch.uint8).numpy() for _ in range(2)]
    images = [Image.fromarray(a) for a in arrays]
    result = evaluate_tokenizer(tokenizer, ("reconstruction",), images=images, max_side=None)
    assert result["settings"]["images"] == ["image_0", "image_1"]
    assert [(p["height"], p["width"]) for p in result["reconstruction"]["per_image"]] == [(40, 56), (40, 56)]
    with pytest.raises(ValueError, match="no images to evaluate"):
        evaluate_tokenizer(tokenizer, ("reconstruction",), images={})
    with pytest.raises(TypeError, match="must be PIL images"):
        evaluate_tokenizer(tokenizer, ("reconstruction",), images={"x": arrays[0]})


def test_vtok_eval_tokenizer_on_a_users_image_folder(tokenizer, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = torch.Generator().manual_seed(1)
    for i, size in enumerate([(40, 64), (48, 48), (72, 40)]):
        array = (torch.rand(*size, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "report"
    vtok(["eval", "tokenizer", "--model", str(_saved(tokenizer, tmp_path)), "--out", str(out), "--suites",
          "reconstruction", "codebook", "--images", str(folder), "--max-side", "0"])
    results = json.loads((out / "results.json").read_text())
    per_image = results["reconstruction"]["per_image"]
    assert len(per_image) == 3 and results["reconstruction"]["num_images"] == 3  # the broken file is skipped
    assert sorted((p["height"], p["width"]) for p in per_image) == [(40, 64), (48, 48), (72, 40)]  # native sizes
    assert "skipping an image (unreadable_image)" in capsys.readouterr().err
