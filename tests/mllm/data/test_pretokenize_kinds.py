"""Pre-tokenization of the three record kinds: kinds are detected from a record's fields, documents and conversations
(HF chat parts, LLaVA's images list with <image> placeholders, LLaVA's own files) are stored as JSON text structure +
one id array per image in reading order, bad records are counted by reason, an interrupted run resumes to the same
dataset, and a caption dataset is exactly what the previous version wrote."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from mllm.cli import main as vtok
from mllm.data import pretokenize as pt
from mllm.data.pretokenize_kinds import (
    BadRecord,
    parse_row,
    record_kind,
    source_kind,
)
from mllm.data.records import ArrowDocuments, ArrowRecords
from mllm.data.tasks import Conversation, Document
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values

FIXTURE = Path(__file__).parent / "fixtures" / "pretokenized_captions_27f7256"


def settings(kind_data, **kw):
    return pt.PretokenizeSettings(visual_tokenizer=kind_data.tokenizer, shard_size=3, **kw)


def direct_ids(kind_data) -> torch.Tensor:
    """Every source image encoded in one batch: (6, 4, 4)."""
    return VisualTokenizer.from_pretrained(kind_data.tokenizer).encode(to_pixel_values(kind_data.images))


@pytest.fixture(scope="module")
def reference(kind_data, tmp_path_factory):
    """An uninterrupted single-process run of each kind: {kind: out folder}."""
    root = tmp_path_factory.mktemp("kinds_ref")
    for kind, source in kind_data.sources.items():
        pt.pretokenize(source.path, str(root / kind), settings(kind_data), batch_size=2)
    return {kind: root / kind for kind in kind_data.sources}


# ------------------------------------------------------------------------------------------ detection, parsing
def test_kinds_are_detected_from_the_fields(kind_data, tmp_path):
    assert record_kind({"image": "a.png", "caption": "a red circle"}) == "captions"
    assert record_kind({"image": "a.png", "content": "a caption in a column named content"}) == "captions"
    assert record_kind({"content": [{"type": "text", "text": "hi"}]}) == "documents"
    assert record_kind({"messages": []}) == record_kind({"conversations": []}) == "conversations"
    assert {kind: source_kind(s.path) for kind, s in kind_data.sources.items()} == {
        "documents": "documents", "conversations": "conversations"}
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{not json\n{"image": "a.png", "caption": "x"}\n')
    assert source_kind(str(captions)) == "captions"  # the first record that parses decides
    assert source_kind(str(kind_data.root / "img")) == "captions"  # an image folder


def test_records_are_parsed_into_the_stored_form(kind_data):
    root = str(kind_data.root)
    for kind, source in kind_data.sources.items():
        lines = Path(source.path).read_text().splitlines()
        for index, (stored, numbers) in source.expected.items():
            parsed = parse_row({"json": lines[index]}, kind, root)
            assert json.loads(parsed.record) == stored
            assert parsed.images == tuple(f"{root}/img/{k}.png" for k in numbers)
    bytes_image = {"bytes": b"\x89PNG...", "path": None}
    parsed = parse_row({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                        "images": [bytes_image]}, "conversations", root)
    assert parsed.images == (bytes_image,)  # a save_to_disk image passes through undecoded


@pytest.mark.parametrize("row, reason, match", [
    ({"json": "[1, 2]"}, "malformed_record", "not a JSON object"),
    ({"content": []}, "malformed_record", "content is empty"),
    ({"content": ["a", "b"], "prefix": 2}, "malformed_record", "prefix must be"),
    ({"content": ["text", ""], "prefix": 1}, "malformed_record", "nothing is left after the prefix"),
    ({"content": [{"type": "image", "image": "a.png"}], "images": ["b.png"]}, "image_count_mismatch", "1 image"),
    ({"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}, "malformed_record", "no role"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "malformed_record", "no text or list content"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]},
     "image_count_mismatch", "1 image placeholder"),
    ({"image": "a.png", "caption": "x"}, "malformed_record", "a captions record in a conversations source"),
])
def test_malformed_records_name_their_reason(row, reason, match):
    kind = "documents" if "content" in row else "conversations"
    with pytest.raises(BadRecord, match=match) as caught:
        parse_row(row, kind, None)
    assert caught.value.reason == reason


# ------------------------------------------------------------------------------------------ pre-tokenization
@pytest.mark.parametrize("kind", ["documents", "conversations"])
def test_each_image_is_encoded_once_in_order_and_bad_records_are_counted(kind_data, reference, kind):
    source, out = kind_data.sources[kind], reference[kind]
    dataset = pt.load_pretokenized(str(out), None)
    assert pt.dataset_kind(dataset) == kind and pt.read_manifest(str(out))["kind"] == kind
    assert list(dataset["index"]) == sorted(source.expected)
    expected_ids = direct_ids(kind_data)
    for row in dataset.with_format("numpy"):
        stored, numbers = source.expected[int(row["index"])]
        assert json.loads(str(row["record"])) == stored
        ids = torch.as_tensor(np.asarray(row["image_ids"], dtype=np.int64)).reshape(-1, 4, 4)
        assert torch.equal(ids, expected_ids[numbers])
        assert list(row["width"]) == list(row["height"]) == [32] * len(numbers)
    summary = pt.read_manifest(str(out))["summary"]
    assert summary["skipped"] == source.skipped and summary["kept"] == len(source.expected)
    assert summary["total"] == len(source.expected) + sum(source.skipped.values())
    assert json.loads(dataset.info.description)["skipped"] == source.skipped


@pytest.mark.parametrize("kind", ["documents", "conversations"])
def test_records_read_back_as_documents_and_conversations(kind_data, reference, kind):
    source = kind_data.sources[kind]
    records = ArrowDocuments(pt.load_pretokenized(str(reference[kind]), None), kind, (4, 4))
    expected_ids = direct_ids(kind_data)
    for position, (stored, numbers) in enumerate(source.expected[i] for i in sorted(source.expected)):
        record = records[position]
        if kind == "documents":
            assert isinstance(record, Document) and record.prefix == stored["prefix"]
            texts = [item for item in record.items if isinstance(item, str)]
            images = [item for item in record.items if not isinstance(item, str)]
            assert texts == [item for item in stored["content"] if item != "<image>"]
        else:
            assert isinstance(record, Conversation) and list(record.messages) == stored["messages"]
            images = list(record.images)
        assert len(images) == len(numbers)
        assert all(a.dtype == torch.int64 and torch.equal(a, expected_ids[k]) for a, k in zip(images, numbers))
    assert "<image>" not in " ".join(records.texts) and "a red circle" in records.texts


def test_an_interrupted_run_resumes_to_the_same_dataset(kind_data, reference, tmp_path, monkeypatch):
    source, out = kind_data.sources["conversations"], str(tmp_path / "cut")
    original, encoded = pt._save_shard, []

    def save_then_crash(out_dir, shard, rows, summary):
        original(out_dir, shard, rows, summary)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(pt, "_save_shard", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(source.path, out, settings(kind_data), batch_size=2)
    monkeypatch.setattr(pt, "_save_shard", original)
    real_encode = pt._encode_shard

    def counting_encode(data, shard, *args):
        encoded.append(shard)
        return real_encode(data, shard, *args)

    monkeypatch.setattr(pt, "_encode_shard", counting_encode)
    report = pt.pretokenize(source.path, out, settings(kind_data), batch_size=5)  # other batches: the same ids
    assert encoded == [1, 2, 3] and report.skipped == source.skipped
    assert pt.load_pretokenized(out, None).to_dict() == pt.load_pretokenized(str(reference["conversations"]),
                                                                             None).to_dict()
    with pytest.raises(ValueError, match="other settings.*kind: 'conversations' -> 'documents'"):
        pt.pretokenize(source.path, out, settings(kind_data, kind="documents"))


def test_the_cli_runs_a_kind_and_refuses_what_does_not_apply(kind_data, tmp_path, capsys):
    source = kind_data.sources["documents"]
    vtok(["pretokenize", "--source", source.path, "--visual-tokenizer", kind_data.tokenizer, "--out",
          str(tmp_path / "o"), "--shard-size", "100", "--kind", "documents"])
    printed = capsys.readouterr().out
    assert f"pre-tokenized {len(source.expected)} of 11 records" in printed
    assert "skipped 1 x image_count_mismatch" in printed
    with pytest.raises(ValueError, match="compressed ids feed the decompression task"):
        pt.pretokenize(source.path, str(tmp_path / "c"), settings(kind_data, compressed=True))
    forced = pt.pretokenize(source.path, str(tmp_path / "f"), settings(kind_data, kind="conversations"))
    assert forced.kept == 0 and forced.skipped == {"malformed_record": 11}  # documents are not conversations


def test_conversations_from_a_save_to_disk_dataset(kind_data, tmp_path):
    img = tmp_path / "img"
    shutil.copytree(kind_data.root / "img", img)
    messages = [[{"role": "user", "content": "<image> caption:"}, {"role": "assistant", "content": "a red circle"}],
                [{"role": "user", "content": "<image> <image> compare:"}, {"role": "assistant", "content": "two"}]]
    saved = datasets.Dataset.from_dict({"messages": messages, "images": [[str(img / "0.png")],
                                                                         [str(img / "2.png"), str(img / "1.png")]]})
    saved.cast_column("images", datasets.List(datasets.Image())).save_to_disk(str(tmp_path / "saved"))
    shutil.rmtree(img)  # the images travel inside the saved dataset
    report = pt.pretokenize(str(tmp_path / "saved"), str(tmp_path / "out"), settings(kind_data))
    dataset = pt.load_pretokenized(str(tmp_path / "out"), None)
    assert report.kept == 2 and pt.dataset_kind(dataset) == "conversations"
    ids = [torch.as_tensor(np.asarray(r["image_ids"], dtype=np.int64)) for r in dataset.with_format("numpy")]
    expected = direct_ids(kind_data)
    assert torch.equal(ids[0], expected[[0]]) and torch.equal(ids[1], expected[[2, 1]])


# ------------------------------------------------------------------------------------------ captions unchanged
def test_a_caption_dataset_of_the_previous_version_loads_and_is_rewritten_identically(tmp_path):
    old_dir = FIXTURE / "pretokenized"
    manifest = pt.read_manifest(str(old_dir))
    records = ArrowRecords(pt.load_pretokenized(str(old_dir), manifest["tokenizer_fingerprint"]), compressed=True)
    assert records.kind == "captions" and len(records) == 6 and records[0].image_ids.shape == (4, 4)
    assert "kind" not in manifest and pt.dataset_kind(records.dataset) == "captions"

    torch.manual_seed(0)  # the tokenizer the fixture was written with (written_by.py.txt)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(tmp_path / "vt")
    if VisualTokenizer.from_pretrained(tmp_path / "vt").fingerprint() != manifest["tokenizer_fingerprint"]:
        pytest.skip("this torch version initialises the seeded tokenizer differently from the fixture's")
    shutil.copytree(FIXTURE / "source", tmp_path / "source")
    new = tmp_path / "new"
    pt.pretokenize(str(tmp_path / "source" / "captions.jsonl"), str(new),
                   pt.PretokenizeSettings(visual_tokenizer=str(tmp_path / "vt"), shard_size=4, compressed=True),
                   batch_size=3)
    info = "dataset/dataset_info.json"
    assert (new / info).read_bytes() == (old_dir / info).read_bytes()
    assert arrow_table(new) == arrow_table(old_dir)  # same schema (with its metadata) and values
    assert arrow_table(new).schema.metadata == arrow_table(old_dir).schema.metadata
    new_state, old_state = (json.loads((d / "dataset" / "state.json").read_text()) for d in (new, old_dir))
    new_state.pop("_fingerprint"), old_state.pop("_fingerprint")  # datasets' hash of the code that made the rows
    assert new_state == old_state
    written = pt.read_manifest(str(new))
    assert written["kind"] == "captions"
    assert {k for k in written if written[k] != manifest.get(k)} <= {"kind", "visual_tokenizer", "source"}


def arrow_table(folder: Path) -> pa.Table:
    with pa.memory_map(str(folder / "dataset" / "data-00000-of-00001.arrow")) as f:
        return pa.ipc.open_stream(f).read_all()
