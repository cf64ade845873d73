"""A user's images through one reader (folder, JSONL/CSV list, tar shards, save_to_disk) and the tokenizer stage's
streamed, augmented batches: deterministic per (seed, step), bad files skipped and counted, workers change nothing."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data.image_batches import ImageBatches
from mllm.data.sources import open_image, read_images
from mllm.training.stage import step_batches

FORMATS = ("PNG", "JPEG", "WEBP")


def picture(rng: np.random.Generator, i: int) -> Image.Image:
    width, height = int(rng.integers(24, 72)), int(rng.integers(24, 72))
    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(0, 255, 3)
    array = np.clip(base + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """50 images of mixed sizes and formats in nested folders, one truncated file and one non-image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    names = []
    for i in range(50):
        fmt = FORMATS[i % 3]
        rel = f"{'ab'[i % 2]}/{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}"
        (root / rel).parent.mkdir(exist_ok=True)
        picture(rng, i).save(root / rel, fmt)
        names.append(rel)
    whole = (root / names[0]).read_bytes()
    (root / "a" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image")
    return root, names


def test_an_image_folder_is_read_recursively_without_decoding(image_dir):
    root, names = image_dir
    dataset = read_images(str(root))
    assert dataset.column_names == ["image"] and len(dataset) == 51  # 50 + the truncated PNG; the .txt is ignored
    paths = sorted(row["image"]["path"] for row in dataset)
    assert all(isinstance(p, str) for p in paths) and any(p.endswith("truncated.png") for p in paths)


def test_open_image_names_what_is_wrong(image_dir, tmp_path):
    root, names = image_dir
    image, reason, _ = open_image(str(root / names[1]))
    assert image.mode == "RGB" and reason == ""
    assert open_image(str(root / "a" / "truncated.png"))[1] == "unreadable_image"
    assert open_image(str(tmp_path / "gone.png"))[1] == "missing_image"
    assert open_image(None)[1] == "malformed_record"
    assert open_image({"bytes": b"not an image", "path": "x.png"})[1] == "unreadable_image"


def test_lists_shards_and_saved_datasets_give_the_same_images(image_dir, tmp_path):
    root, names = image_dir
    listed = tmp_path / "list.jsonl"
    listed.write_text("".join(json.dumps({"file": str(root / n), "caption": f"c{i}"}) + "\n"
                              for i, n in enumerate(names[:6])))
    table = read_images(str(listed), image_column="file", caption_column="caption")
    assert table.column_names == ["image", "caption"] and table[2]["caption"] == "c2"
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("path\n" + "".join(f"{n}\n" for n in names[:6]))
    from_csv = read_images(str(csv_file), image_column="path", image_root=str(root))
    assert [r["image"] for r in from_csv] == [str(root / n) for n in names[:6]]
    for shard in range(2):  # webdataset layout: <key>.png + <key>.txt
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard}_{i}"
                data = io.BytesIO()
                open_image(str(root / names[shard * 3 + i]))[0].save(data, "PNG")
                for member, payload in ((f"{key}.png", data.getvalue()), (f"{key}.txt", f"shard {key}".encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    shards = read_images(str(tmp_path / "shard-*.tar"), caption_column="caption")
    assert len(shards) == 6 and shards[4]["caption"] == "shard 1_1"
    first = np.asarray(open_image(shards[0]["image"])[0])
    assert np.array_equal(first, np.asarray(open_image(str(root / names[0]))[0]))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(root / n) for n in names[:4]]}).save_to_disk(str(saved))
    assert len(read_images(str(saved))) == 4
    with pytest.raises(ValueError, match="no image column 'picture'"):
        read_images(str(saved), image_column="picture")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        read_images(str(tmp_path / "none-*.tar"))


def test_batches_are_a_function_of_seed_and_step_and_skip_bad_images(image_dir):
    root, _ = image_dir
    source = read_images(str(root))
    batches = ImageBatches(source, image_size=32, batch_size=8, seed=3)
    first = batches.batch(5)
    assert first["pixel_values"].shape == (8, 3, 32, 32) and first["pixel_values"].dtype == torch.float32
    assert torch.equal(first["pixel_values"], batches.batch(5)["pixel_values"])
    assert not torch.equal(first["pixel_values"], batches.batch(6)["pixel_values"])
    halves = [batches.batch(5, rank, 2)["pixel_values"] for rank in range(2)]
    assert torch.equal(torch.cat([halves[0], halves[1]])[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], first["pixel_values"])
    epoch = sum(int(batches.batch(step)["num_skipped"]) for step in range(len(source) // 8))
    assert epoch == 1  # the truncated file, met once per epoch and replaced by a readable image


def test_workers_build_the_same_batches_in_order(image_dir):
    root, _ = image_dir
    batches = ImageBatches(read_images(str(root)), image_size=16, batch_size=4, seed=0)
    direct = [b["pixel_values"] for b in step_batches(batches.batch, 3, 7)]
    prefetched = [b["pixel_values"] for b in step_batches(batches.batch, 3, 7, num_workers=2)]
    assert len(direct) == 4 and all(torch.equal(a, b) for a, b in zip(direct, prefetched))


def test_aspect_buckets_pick_one_size_per_step(image_dir):
    root, _ = image_dir
    buckets = [(16, 32), (32, 16), (24, 24)]
    batches = ImageBatches(read_images(str(root)), image_size=24, batch_size=4, seed=0, buckets=buckets)
    sizes = {tuple(batches.batch(step)["pixel_values"].shape[-2:]) for step in range(12)}
    assert sizes == set(buckets)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageBatches(read_images(str(root)), 16, 4, crop_scale=(0.0, 1.0))


def test_an_image_folder_keeps_the_imagefolder_conventions(image_dir, tmp_path):
    # captions from metadata.jsonl rows keyed by file_name, train/ test/ sub-folders as splits, records in path order
    root, names = image_dir
    for split, picks in (("train", names[:3]), ("test", names[3:5])):
        for name in picks:
            target = tmp_path / split / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((root / name).read_bytes())
        (tmp_path / split / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": n, "caption": f"picture {n}"}) + "\n" for n in picks))
    train = read_images(str(tmp_path), caption_column="caption")
    assert [r["caption"] for r in train] == [f"picture {n}" for n in sorted(names[:3])]
    assert [r["image"]["path"] for r in train] == [str(tmp_path / "train" / n) for n in sorted(names[:3])]
    assert len(read_images(str(tmp_path), split="test")) == 2
    with pytest.raises(ValueError, match="no 'validation' one"):
        read_images(str(tmp_path), split="validation")
    with pytest.raises(ValueError, match="no caption column 'caption'"):
        read_images(str(root), caption_column="caption")
