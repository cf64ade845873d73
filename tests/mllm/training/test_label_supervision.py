"""Label supervision of a tokenizer's codes (``label_classes`` / ``label_weight``, ``data.labels``): the head on the
quantized code map, its loss and gradient path, and the tokenizer stage's labelled shapes batches."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from huggingface_hub.errors import StrictDataclassFieldValidationError

from mllm.data import shapes
from mllm.data.image_batches import ImageBatches
from mllm.data.sources import read_images
from mllm.training.loop import run
from mllm.training.recipe import load_recipe
from mllm.training.stages.tokenizer import SHAPE_LABELS, in_memory_batches, tokenizer_stage
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.nn.labels import LabelHead

VIT_FSQ = ["model.encoder_options.width=16", "model.decoder_options.width=16", "model.latent_dim=8",
           "data.num_train=40", "train.batch_size=8", "train.save_every=0", "train.warmup_steps=0",
           "train.log_every=1"]


def vit_config(**kw):
    base = dict(encoder="vit", decoder="vit", quantizer={"type": "fsq", "levels": [5, 5, 5]}, latent_dim=8,
                downsample=8, image_size=32, encoder_options={"width": 16, "depth": 1, "num_heads": 2},
                decoder_options={"width": 16, "depth": 1, "num_heads": 2})
    return VisualTokenizerConfig(**(base | kw))


def test_head_reads_any_code_map_size_and_splits_the_label_sets():
    head = LabelHead(8, [3, 6])
    for h, w in ((4, 4), (16, 16), (3, 5)):
        shape_logits, colour_logits = head(torch.randn(2, 8, h, w))
        assert shape_logits.shape == (2, 3) and colour_logits.shape == (2, 6)
    with pytest.raises(ValueError, match=r"code map \(B, D, h, w\)"):
        head(torch.randn(2, 8, 16))


def test_unlabelled_images_add_nothing_and_accuracy_counts_labelled_ones():
    torch.manual_seed(0)
    head = LabelHead(8, [3, 4])
    codes = torch.randn(5, 8, 4, 4)
    labels = torch.tensor([[0, 1], [2, -1], [-1, -1], [1, 3], [-1, 0]])
    loss, metrics = head.loss(codes, labels)
    shape_logits, colour_logits = head(codes)
    rows0, rows1 = torch.tensor([0, 1, 3]), torch.tensor([0, 3, 4])
    expected = (F.cross_entropy(shape_logits[rows0], labels[rows0, 0])
                + F.cross_entropy(colour_logits[rows1], labels[rows1, 1])) / 2
    torch.testing.assert_close(loss, expected)
    hits = (shape_logits[rows0].argmax(-1) == labels[rows0, 0]).float().mean()
    assert metrics["label_accuracy_0"] == pytest.approx(float(hits))
    # a batch without any label (all photos): zero loss that still backpropagates, no accuracy reported
    loss, metrics = head.loss(codes, torch.full((5, 2), -1))
    assert float(loss.detach()) == 0.0 and loss.requires_grad and metrics == {}
    loss.backward()


@pytest.mark.parametrize("labels,match", [
    (torch.zeros(5, 3, dtype=torch.long), r"shape \(batch, label sets\) = \(5, 2\)"),
    (torch.zeros(5, 2), "integer tensor"),
    (torch.tensor([[0, 0]] * 4 + [[3, 0]]), "label 3 of image 4 is outside label set 0's classes 0..2"),
    (torch.tensor([[0, -2]] * 5), "label -2 of image 0"),
])
def test_malformed_labels_are_named(labels, match):
    with pytest.raises(ValueError, match=match):
        LabelHead(8, [3, 4]).loss(torch.randn(5, 8, 4, 4), labels)


def test_label_loss_is_added_weighted_and_reaches_the_encoder_through_the_quantizer():
    torch.manual_seed(0)
    model = VisualTokenizer(vit_config(label_classes=[3], label_weight=0.5))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 1, 2, 1])[:, None]
    plain, labelled = model(x), model(x, labels=labels)
    assert plain.label_loss is None and labelled.label_loss is not None
    head_loss, _ = model.label_head.loss(model.quantizer(model.encode_latents(x)).quantized, labels)
    torch.testing.assert_close(labelled.label_loss, 0.5 * head_loss)
    torch.testing.assert_close(labelled.loss, plain.loss + labelled.label_loss)
    assert "label_accuracy_0" in labelled.metrics
    model.zero_grad()
    labelled.label_loss.backward()  # the label term alone: it must move the encoder, not just the head
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.parameters())
    # encode / decode do not involve the head: the same ids as a tokenizer without one, given the same weights
    bare = VisualTokenizer(vit_config())
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("label_head.")})
    assert torch.equal(bare.eval().encode(x), model.eval().encode(x))


def test_label_config_is_checked_and_saved(tmp_path):
    for bad, match in (([], "non-empty list"), ([3, 1], "integers >= 2")):
        with pytest.raises(ValueError, match=match):
            vit_config(label_classes=bad)
    with pytest.raises(StrictDataclassFieldValidationError, match="label_classes"):  # the config's type check
        vit_config(label_classes="shape")
    with pytest.raises(ValueError, match="label_weight must be >= 0"):
        vit_config(label_classes=[3], label_weight=-1)
    with pytest.raises(ValueError, match="no label head: set label_classes"):
        VisualTokenizer(vit_config())(torch.zeros(1, 3, 32, 32), labels=torch.zeros(1, 1, dtype=torch.long))
    model = VisualTokenizer(vit_config(label_classes=[3, 6], label_weight=0.25))
    model.save_pretrained(tmp_path)
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert loaded.config.label_classes == [3, 6] and loaded.config.label_weight == 0.25
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_shapes_batches_carry_each_renders_attribute_and_photos_none():
    recipe = load_recipe("recipes/demo_tokenizer.yaml", VIT_FSQ + ["data.photo_fraction=0.25",
                                                                    "data.labels=[shape, colour]"])
    batch_for_step, _ = in_memory_batches(recipe)
    seen = torch.cat([batch_for_step(step, 0, 1)["labels"] for step in range(5)])  # every record once
    assert seen.shape == (40, 2)
    assert int((seen[:, 0] == -1).sum()) == 10 and torch.equal(seen[:, 0] == -1, seen[:, 1] == -1)
    batch = batch_for_step(0, 0, 1)
    for image, (shape, colour) in zip(batch["pixel_values"], batch["labels"].tolist()):
        if shape == -1:
            continue
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().numpy()
        read = shapes.classify(pixels)  # the label is the render's own attribute, read back from its pixels
        assert read["shape"] == SHAPE_LABELS["shape"][shape] and read["colour"] == SHAPE_LABELS["colour"][colour]


def test_two_size_batches_label_the_shapes_steps_only():
    recipe = load_recipe("recipes/demo_tokenizer.yaml", VIT_FSQ + ["data.photo_fraction=0.5", "data.photo_size=64",
                                                                    "data.labels=[shape]"])
    batch_for_step, _ = in_memory_batches(recipe)
    for step in range(6):
        batch = batch_for_step(step, 0, 1)
        photo = batch["pixel_values"].shape[-1] == 64
        assert batch["labels"].shape == (8, 1) and bool((batch["labels"] == -1).all()) == photo


def test_stage_fills_label_classes_trains_and_logs_accuracy(tmp_path):
    recipe = load_recipe("recipes/demo_tokenizer.yaml",
                         VIT_FSQ + [f"output_dir={tmp_path}", "train.steps=3", "data.labels=[shape, position]"])
    assert tokenizer_stage(recipe).model.config.label_classes == [3, 4]
    run(recipe)
    saved = VisualTokenizer.from_pretrained(tmp_path / "final")
    assert saved.config.label_classes == [3, 4]
    log = (tmp_path / "log.jsonl").read_text()
    assert '"label_accuracy_0"' in log and '"label_accuracy_1"' in log


@pytest.mark.parametrize("overrides,match", [
    (["data.labels=[size]"], r"data.labels \['size'\] are not shapes attributes"),
    (["data.labels=[shape, shape]"], "distinct label names"),
    (["data.labels=[shape]", "model.label_classes=[4]"], r"model.label_classes \[4\] does not match"),
])
def test_bad_label_recipes_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_stage(load_recipe("recipes/demo_tokenizer.yaml", VIT_FSQ + overrides))


# ------------------------------------------------------------------------------- labels of a user's image source
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """An ImageNet-style layout: train/<class>/<n>.png, 4 images per class, each class its own colour."""
    root = tmp_path_factory.mktemp("classes")
    for c, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            colour = np.zeros((20, 24, 3), np.uint8) + np.uint8(80 * c + 10 * i)
            Image.fromarray(colour).save(root / "train" / name / f"{i}.png")
    return root


def test_an_image_folder_labels_each_image_by_its_class_folder(class_folders):
    source = read_images(str(class_folders), label_columns=["folder"])
    assert source.column_names == ["image", "folder"] and sorted(set(source["folder"])) == list(CLASSES)
    batches = ImageBatches(source, image_size=16, batch_size=12, seed=0, labels=["folder"])
    assert batches.label_values == [list(CLASSES)] and batches.label_classes == [3]
    batch = batches.batch(0)
    assert batch["labels"].shape == (12, 1)
    for pixels, (label,) in zip(batch["pixel_values"], batch["labels"].tolist()):
        level = float((pixels.mean() + 1) * 127.5)  # each class's images are one flat colour: 80 * class + 10 * i
        assert int(round(level)) // 80 == label, (level, label)


def test_lists_shards_and_saved_datasets_carry_label_columns(class_folders, tmp_path):
    files = sorted((class_folders / "train").glob("*/*.png"))
    rows = [{"file": str(f), "kind": f.parent.name, "size": "big" if i % 2 else "small"} for i, f in enumerate(files)]
    rows[3].pop("kind")  # a record without the label: unlabelled (-1)
    listed = tmp_path / "list.jsonl"
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = read_images(str(listed), image_column="file", label_columns=["kind", "size"])
    batches = ImageBatches(table, 16, 12, labels=["kind", "size"])
    assert batches.label_values == [list(CLASSES), ["big", "small"]]
    index = batches.label_index
    assert index[3, 0] == -1 and index[0].tolist() == [0, 1] and index[1].tolist() == [0, 0]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # webdataset: <key>.png + <key>.cls
        for i, f in enumerate(files[:6]):
            for member, payload in ((f"{i:03d}.png", f.read_bytes()), (f"{i:03d}.cls", str(CLASSES.index(f.parent.name)).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shards = read_images(str(tmp_path / "shard-*.tar"), label_columns=["cls"])
    assert shards["cls"] == [str(CLASSES.index(f.parent.name)) for f in files[:6]]  # .cls holds an integer
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [i % 3 for i in range(12)]}).save_to_disk(
        str(saved))
    from_disk = ImageBatches(read_images(str(saved), label_columns=["label"]), 16, 4, labels=["label"])
    assert from_disk.label_values == [["0", "1", "2"]] and from_disk.label_index[:4, 0].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"no label column\(s\) \['colour'\]"):
        read_images(str(saved), label_columns=["colour"])
    with pytest.raises(ValueError, match=r"no record of .*list.jsonl has the label column\(s\) \['colour'\]"):
        read_images(str(listed), image_column="file", label_columns=["colour"])
    with pytest.raises(ValueError, match="cannot be named"):
        read_images(str(saved), label_columns=["image"])
    one = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": ["x"] * 12})
    with pytest.raises(ValueError, match="label column 'label' has 1 distinct value"):
        ImageBatches(one, 16, 4, labels=["label"])


def test_tokenizer_stage_trains_a_label_head_on_a_users_class_folders(class_folders, tmp_path):
    recipe = load_recipe("recipes/demo_tokenizer.yaml", VIT_FSQ + [
        f"output_dir={tmp_path}", "train.steps=3", "data.dataset=images", f"data.path={class_folders}",
        "data.image_size=16", "data.labels=[folder]", "model.label_weight=0.5"])
    run(recipe)
    saved = VisualTokenizer.from_pretrained(tmp_path / "final")
    assert saved.config.label_classes == [3] and saved.config.label_weight == 0.5
    assert '"label_accuracy_0"' in (tmp_path / "log.jsonl").read_text()
