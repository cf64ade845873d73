"""Small generated sources of every record kind for the pre-tokenization tests: shape renders, a tiny visual
tokenizer, and a JSONL of captions, documents and conversations, each with good records (one to three images, or
none), one corrupt image, one missing image and malformed records; ``expected`` lists what each kept record stores."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data import shapes
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

NUM_IMAGES = 6

DOCUMENTS = [
    ({"content": [{"type": "text", "text": "a red circle"}, {"type": "image", "image": "img/0.png"},
                  {"type": "text", "text": "and a blue square"}, {"type": "image", "image": "img/1.png"}]},
     {"content": ["a red circle", "<image>", "and a blue square", "<image>"], "prefix": 0}, [0, 1]),
    ({"content": ["a green triangle", {"type": "image"}], "images": ["img/2.png"], "prefix": 1},
     {"content": ["a green triangle", "<image>"], "prefix": 1}, [2]),
    ({"content": [{"type": "image", "image": "img/corrupt.png"}, "a broken picture"]}, "unreadable_image", None),
    ({"content": [{"type": "text", "text": "<image> two in one text <image>"}], "images": ["img/3.png", "img/4.png"]},
     {"content": ["<image>", "two in one text", "<image>"], "prefix": 0}, [3, 4]),
    ({"content": [{"type": "image", "image": "img/nowhere.png"}, "lost"]}, "missing_image", None),
    ({"content": [{"type": "video", "video": "clip.mp4"}]}, "malformed_record", None),
    ({"content": ["only words here"]}, {"content": ["only words here"], "prefix": 0}, []),
    ({"content": [{"type": "image"}, "one too few"], "images": []}, "image_count_mismatch", None),
    ({"content": [{"type": "image", "image": "img/5.png"}, "a blue circle", {"type": "image", "image": "img/0.png"},
                  "a red circle", {"type": "image", "image": "img/1.png"}], "prefix": 2},
     {"content": ["<image>", "a blue circle", "<image>", "a red circle", "<image>"], "prefix": 2}, [5, 0, 1]),
    ({"image": "img/0.png", "caption": "a caption record"}, "malformed_record", None),
]

CONVERSATIONS = [
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                {"type": "text", "text": "caption:"}]},
                   {"role": "assistant", "content": "a red circle"}]},
     {"messages": [{"role": "user", "content": "<image> caption:"}, {"role": "assistant", "content": "a red circle"}]},
     [0]),
    ({"messages": [{"role": "user", "content": "<image> caption:"}, {"role": "assistant", "content": "a blue square"},
                   {"role": "user", "content": "draw: a green triangle"}, {"role": "assistant", "content": "<image>"}],
      "images": ["img/1.png", "img/2.png"]},
     {"messages": [{"role": "user", "content": "<image> caption:"}, {"role": "assistant", "content": "a blue square"},
                   {"role": "user", "content": "draw: a green triangle"}, {"role": "assistant", "content": "<image>"}]},
     [1, 2]),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/corrupt.png"}]},
                   {"role": "assistant", "content": "broken"}]}, "unreadable_image", None),
    ({"image": "img/3.png", "conversations": [{"from": "human", "value": "<image> caption:"},
                                               {"from": "gpt", "value": "a red square"}]},
     {"messages": [{"role": "user", "content": "<image> caption:"}, {"role": "assistant", "content": "a red square"}]},
     [3]),
    ({"messages": [{"role": "user", "content": "<image> where is it?"}, {"role": "assistant", "content": "lost"}],
      "images": ["img/nowhere.png"]}, "missing_image", None),
    ({"messages": [{"role": "user", "content": "<image> caption:"}], "images": ["img/4.png"]}, "malformed_record",
     None),
    ({"messages": [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "two"}],
      "images": ["img/4.png"]}, "image_count_mismatch", None),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say circle"},
                   {"role": "assistant", "content": "circle"}]},
     {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say circle"},
                   {"role": "assistant", "content": "circle"}]}, []),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "caption:"},
                                                {"type": "image", "image": "img/4.png"}]},
                   {"role": "assistant", "content": "a green square"}, {"role": "user", "content": "and this <image>"},
                   {"role": "assistant", "content": "a blue triangle"}], "images": ["img/5.png"]},
     {"messages": [{"role": "user", "content": "caption: <image>"}, {"role": "assistant", "content": "a green square"},
                   {"role": "user", "content": "and this <image>"},
                   {"role": "assistant", "content": "a blue triangle"}]},
     [4, 5]),
]

RECORDS = {"documents": DOCUMENTS, "conversations": CONVERSATIONS}


@dataclass
class KindSource:
    """A generated JSONL of one kind: its path, and the stored record / image numbers of each kept source line."""

    path: str
    kind: str
    expected: dict = field(default_factory=dict)  # source index -> (stored record, [image numbers])
    skipped: dict = field(default_factory=dict)  # reason -> count


@dataclass
class KindData:
    root: Path
    tokenizer: str
    images: list
    sources: dict
    captions: str  # a JSONL of captions (the images, a corrupt and a missing one, a line that is not JSON)


def tiny_visual_tokenizer(path, seed=0) -> str:
    torch.manual_seed(seed)
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(path)
    return str(path)


def write_source(root: Path, kind: str) -> KindSource:
    source = KindSource(str(root / f"{kind}.jsonl"), kind)
    lines = []
    for index, (record, outcome, images) in enumerate(RECORDS[kind]):
        lines.append(json.dumps(record))
        if isinstance(outcome, str):
            source.skipped[outcome] = source.skipped.get(outcome, 0) + 1
        else:
            source.expected[index] = (outcome, images)
    lines.append("{not json")
    source.skipped["malformed_record"] = source.skipped.get("malformed_record", 0) + 1
    Path(source.path).write_text("\n".join(lines) + "\n")
    return source


@pytest.fixture(scope="session")
def kind_data(tmp_path_factory) -> KindData:
    root = tmp_path_factory.mktemp("kinds")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    specs = [shapes.ShapeSpec(c, s, "top left") for c in ("red", "blue") for s in shapes.SHAPES]
    for k, spec in enumerate(specs[:NUM_IMAGES]):
        shapes.render(spec, size=32, rng=rng).save(root / "img" / f"{k}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    images = [Image.open(root / "img" / f"{k}.png").convert("RGB") for k in range(NUM_IMAGES)]
    sources = {kind: write_source(root, kind) for kind in RECORDS}
    captions = [{"image": f"img/{k}.png", "caption": spec.caption} for k, spec in enumerate(specs[:NUM_IMAGES])]
    captions[2:2] = [{"image": "img/corrupt.png", "caption": "broken"}, {"image": "img/nowhere.png", "caption": "lost"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions) + "\n{not json\n")
    return KindData(root, tiny_visual_tokenizer(root / "vt"), images, sources, str(root / "captions.jsonl"))
