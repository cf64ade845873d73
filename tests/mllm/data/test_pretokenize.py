"""Pre-tokenization: ids equal direct encoding, bad records are counted and skipped, interrupted runs resume to the
same dataset, workers agree, and ids of another visual tokenizer are refused."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mllm.cli import main as vtok
from mllm.data import pretokenize as pt
from mllm.data import shapes
from mllm.data.tasks import compress_pixels
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values

NUM_GOOD = 20
BAD = {"missing_image": 1, "unreadable_image": 1, "empty_caption": 1, "malformed_record": 1}


def tiny_tokenizer(path, seed=0):
    torch.manual_seed(seed)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """20 shape renders + 4 bad records, as a JSONL captions file; returns (jsonl path, images, captions)."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    specs = [shapes.ShapeSpec(c, s, p) for c in ("red", "blue") for s in shapes.SHAPES for p in shapes.POSITIONS]
    lines = []
    for k, spec in enumerate(specs[:NUM_GOOD]):
        (root / "img").mkdir(exist_ok=True)
        shapes.render(spec, size=32, rng=rng).save(root / "img" / f"{k}.png")
        lines.append({"image": f"img/{k}.png", "caption": spec.caption})
        if k == 3:
            lines.append({"image": "img/nowhere.png", "caption": "a lost image"})
        if k == 7:
            (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            lines.append({"image": "img/corrupt.png", "caption": "a corrupt image"})
        if k == 11:
            lines.append({"image": f"img/{k}.png", "caption": "   "})
    images = [Image.open(root / "img" / f"{k}.png").convert("RGB") for k in range(NUM_GOOD)]
    captions = [line["caption"] for line in lines if line["caption"].strip() and "image" not in line["caption"]]
    path = root / "captions.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    return str(path), images, captions


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vt"))


@pytest.fixture(scope="module")
def reference(source, tokenizer_path, tmp_path_factory):
    """One uninterrupted run through the CLI: (out folder, its dataset)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    vtok(["pretokenize", "--source", source[0], "--visual-tokenizer", tokenizer_path, "--out", str(out),
          "--shard-size", "6", "--batch-size", "4"])
    return out, datasets.load_from_disk(str(out / "dataset"))


def settings(tokenizer_path, **kw):
    return pt.PretokenizeSettings(visual_tokenizer=tokenizer_path, shard_size=6, **kw)


def ids_of(dataset, column="image_ids"):
    return torch.as_tensor(dataset.with_format("numpy")[:][column])


def test_ids_equal_direct_encoding_and_bad_records_are_counted(source, tokenizer_path, reference):
    out, dataset = reference
    _, images, captions = source
    expected = VisualTokenizer.from_pretrained(tokenizer_path).encode(to_pixel_values(images))  # (20, 4, 4)
    assert torch.equal(ids_of(dataset).long(), expected)
    assert list(dataset["caption"]) == captions
    assert set(dataset["width"]) == set(dataset["height"]) == {32}
    manifest = pt.read_manifest(str(out))
    assert manifest["state"] == "complete" and manifest["summary"]["kept"] == NUM_GOOD
    assert manifest["summary"]["total"] == NUM_GOOD + sum(BAD.values())
    assert manifest["summary"]["skipped"] == BAD
    assert {e["reason"] for e in manifest["summary"]["examples"]} == set(BAD)
    assert not (out / "shards").exists()  # merged and cleaned up
    assert pt.dataset_fingerprint(dataset) == VisualTokenizer.from_pretrained(tokenizer_path).fingerprint()


def test_cli_prints_the_summary(source, tokenizer_path, tmp_path, capsys):
    vtok(["pretokenize", "--source", source[0], "--visual-tokenizer", tokenizer_path, "--out", str(tmp_path / "o"),
          "--shard-size", "100"])
    printed = capsys.readouterr().out
    assert f"pre-tokenized {NUM_GOOD} of 24 records" in printed and "skipped 1 x unreadable_image" in printed


def test_interrupted_run_resumes_to_the_same_dataset(source, tokenizer_path, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "cut")
    original, encoded = pt._save_shard, []

    def save_then_crash(out_dir, shard, rows, summary):
        original(out_dir, shard, rows, summary)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(pt, "_save_shard", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(source[0], out, settings(tokenizer_path), batch_size=4)
    assert pt.read_manifest(out)["state"] == "running"
    with pytest.raises(ValueError, match="incomplete"):
        pt.load_pretokenized(out, None)

    monkeypatch.setattr(pt, "_save_shard", original)
    real_encode = pt._encode_shard
    def counting_encode(data, shard, *args):
        encoded.append(shard)
        return real_encode(data, shard, *args)

    monkeypatch.setattr(pt, "_encode_shard", counting_encode)
    report = pt.pretokenize(source[0], out, settings(tokenizer_path), batch_size=4)
    assert encoded == [1, 2, 3]  # shard 0 was complete and skipped
    resumed = pt.load_pretokenized(out, report.fingerprint)
    assert resumed.to_dict() == reference[1].to_dict()
    assert report.kept == NUM_GOOD and report.skipped == BAD


def test_two_workers_match_one(source, tokenizer_path, reference, tmp_path):
    pt.pretokenize(source[0], str(tmp_path / "p2"), settings(tokenizer_path), batch_size=4, num_proc=2)
    assert pt.load_pretokenized(str(tmp_path / "p2"), None).to_dict() == reference[1].to_dict()


def test_other_tokenizer_is_refused(source, tokenizer_path, reference, tmp_path):
    out = str(reference[0])
    other = tiny_tokenizer(tmp_path / "other", seed=1)
    other_fp = VisualTokenizer.from_pretrained(other).fingerprint()
    with pytest.raises(pt.FingerprintMismatchError, match="different codebook"):
        pt.load_pretokenized(out, other_fp)
    with pytest.raises(pt.FingerprintMismatchError, match="never mixed"):
        pt.pretokenize(source[0], out, settings(other))
    with pytest.raises(ValueError, match="other settings.*image_size"):
        pt.pretokenize(source[0], out, settings(tokenizer_path, image_size=64))
    with pytest.raises(ValueError, match="not empty"):
        pt.pretokenize(source[0], str(tmp_path), settings(other))  # a folder that is not a pre-tokenization
    fresh = str(tmp_path / "fresh")
    pt.pretokenize(source[0], fresh, settings(tokenizer_path))
    report = pt.pretokenize(source[0], fresh, settings(other), overwrite=True)  # restarts cleanly
    assert report.fingerprint == other_fp and pt.dataset_fingerprint(pt.load_pretokenized(fresh, other_fp)) == other_fp


def test_datasets_sources_and_compressed_ids(source, tokenizer_path, reference, tmp_path):
    _, images, captions = source
    paths = [str(Path(source[0]).parent / "img" / f"{k}.png") for k in range(NUM_GOOD)]
    saved = datasets.Dataset.from_dict({"picture": paths, "text": captions})
    saved = saved.cast_column("picture", datasets.Image())
    saved.save_to_disk(str(tmp_path / "hf"))
    cfg = settings(tokenizer_path, image_column="picture", caption_column="text", compressed=True)
    pt.pretokenize(str(tmp_path / "hf"), str(tmp_path / "out"), cfg)
    dataset = pt.load_pretokenized(str(tmp_path / "out"), None)
    assert torch.equal(ids_of(dataset), ids_of(reference[1]))
    vt = VisualTokenizer.from_pretrained(tokenizer_path)
    assert torch.equal(ids_of(dataset, "compressed_ids").long(), vt.encode(compress_pixels(to_pixel_values(images))))



def test_a_run_killed_before_its_first_manifest_write_can_be_rerun(source, tokenizer_path, reference, tmp_path):
    # issue 15, defect 10: what a kill leaves before pretokenize.json exists (an empty shards/ and a half-written
    # manifest) is cleaned up instead of making the folder unusable
    out = tmp_path / "killed"
    (out / pt.SHARDS_DIR).mkdir(parents=True)
    (out / (pt.MANIFEST_NAME + ".tmp")).write_text('{"half": ')
    report = pt.pretokenize(source[0], str(out), settings(tokenizer_path))
    assert report.kept == NUM_GOOD
    assert ids_of(datasets.load_from_disk(str(out / pt.DATASET_DIR))).tolist() == ids_of(reference[1]).tolist()
    other = tmp_path / "users"
    other.mkdir()
    (other / "notes.txt").write_text("the user's file")
    with pytest.raises(ValueError, match="not empty and holds no"):
        pt.pretokenize(source[0], str(other), settings(tokenizer_path))
    assert (other / "notes.txt").read_text() == "the user's file"


def test_a_shard_whose_records_are_all_bad_does_not_stop_the_merge(source, tokenizer_path, tmp_path):
    # issue 15, defect 1: one good and one missing image with shard_size=1 -> an empty shard, merged like any other
    root = Path(source[0]).parent
    listed = tmp_path / "two.jsonl"
    listed.write_text(json.dumps({"image": str(root / "img" / "0.png"), "caption": "a red circle"}) + "\n"
                      + json.dumps({"image": str(root / "img" / "nowhere.png"), "caption": "lost"}) + "\n")
    out = tmp_path / "out"
    for overwrite in (False, False, True):  # first run, re-run of a complete folder, --overwrite
        one_per_shard = pt.PretokenizeSettings(visual_tokenizer=tokenizer_path, shard_size=1)
        report = pt.pretokenize(str(listed), str(out), one_per_shard, overwrite=overwrite)
        assert (report.kept, report.skipped) == (1, {"missing_image": 1})
    assert len(datasets.load_from_disk(str(out / pt.DATASET_DIR))) == 1


def test_encode_chunk_follows_the_device_and_does_not_change_the_ids(source, tokenizer_path, reference, tmp_path,
                                                                     monkeypatch):
    from mllm.data import pretokenize_encode as encode

    assert encode.encode_chunk_size("cpu", 64) == 1 and encode.encode_chunk_size("cuda:1", 64) == 64
    assert encode.encode_chunk_size("cpu", 64, requested=8) == 8
    with pytest.raises(ValueError, match="encode_batch_size must be >= 1"):
        encode.encode_chunk_size("cpu", 64, requested=0)
    calls = []
    original = VisualTokenizer.encode
    monkeypatch.setattr(VisualTokenizer, "encode", lambda self, x, **kw: calls.append(len(x)) or original(self, x, **kw))
    for chunk in (None, 3):
        calls.clear()
        out = tmp_path / f"chunk-{chunk}"
        pt.pretokenize(source[0], str(out), settings(tokenizer_path, compressed=True), batch_size=4,
                       encode_batch_size=chunk)
        # image_ids and compressed_ids of each good image, plus the one image of the start-up probe
        assert max(calls) == (chunk or 1) and sum(calls) == 2 * NUM_GOOD + 1
        dataset = pt.load_pretokenized(str(out), None)
        assert torch.equal(ids_of(dataset), ids_of(reference[1]))
