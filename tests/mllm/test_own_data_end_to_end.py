"""The README's "Train on your own data" commands, run as written (with tiny-size overrides appended) on generated
files: image folder -> tokenizer -> pre-tokenized captions and conversations -> pre-training a "pretrained" LLM ->
instruction tuning the pre-trained bundle -> vtok generate."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.cli import main as vtok
from mllm.data import shapes
from mllm.data.tasks import TINY_CHAT_TEMPLATE
from mllm.model import shapes_vocabulary
from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import VisualTokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "tokenizer_images.yaml": ["data.image_size=32", "model.base_channels=8", "model.quantizer.codebook_size=32",
                              "train.steps=2", "train.batch_size=2", "train.num_workers=0", "train.warmup_steps=0"],
    "pretrain.yaml": ["train.steps=2", "train.batch_size=4", "train.gradient_accumulation_steps=1",
                      "train.num_workers=0", "train.warmup_steps=0", "train.save_every=0", "data.max_tokens=128"],
    "sft.yaml": ["train.steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.save_every=0",
                 "data.max_tokens=128"],
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Train on your own data"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def make_user_files(work: Path) -> None:
    """my_images/, captions.jsonl and conversations.jsonl (paths relative to the files), and a saved tiny LLM."""
    split = shapes.make_splits(seed=0)
    renders = shapes.ShapesDataset(split.train, size=24, seed=0)
    (work / "my_images").mkdir()
    captions, chats = [], []
    for i in range(12):
        item = renders[i]
        name = f"my_images/{i:02d}.png"
        item["image"].save(work / name)
        captions.append({"image": name, "caption": item["caption"]})
        chats.append({"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                               {"type": "text", "text": "caption :"}]},
                                   {"role": "assistant", "content": item["caption"]}]})
    Image.new("RGB", (3, 3)).save(work / "my_images" / "tiny.png")  # smaller than a crop: still read
    (work / "my_images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (work / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (work / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    tokenizer = build_word_tokenizer(shapes_vocabulary({"instruction": 1}))
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    tokenizer.save_pretrained(work / "MY_LLM")
    llm.save_pretrained(work / "MY_LLM")


def as_vtok_args(command: list[str], work: Path) -> list[str]:
    if command[:4] == ["accelerate", "launch", "-m", "mllm.train"]:
        command = ["vtok", "train", *command[4:]]
    assert command[0] == "vtok", command
    args = [str(ROOT / a) if a.startswith("recipes/") else a for a in command[1:]]
    args = [a.replace("MY_LLM", str(work / "MY_LLM")) for a in args]
    if args[0] == "train":
        args += TINY[Path(args[1]).name]
    return args


def test_the_readme_commands_train_on_your_own_data(tmp_path, monkeypatch):
    make_user_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (runs/, data/, my_images/) start here
    commands = readme_commands()
    assert [c[1] if c[0] == "vtok" else c[3] for c in commands] == [
        "train", "pretokenize", "pretokenize", "mllm.train", "mllm.train", "generate"]
    for command in commands:
        vtok(as_vtok_args(command, tmp_path))
    tokenizer = VisualTokenizer.from_pretrained(tmp_path / "runs/tok/final")
    assert tokenizer.codebook_size == 32
    for name, kind in (("captions", "captions"), ("chats", "conversations")):
        manifest = json.loads((tmp_path / "data" / name / "pretokenize.json").read_text())
        assert manifest["state"] == "complete" and manifest["kind"] == kind
    for run in ("pretrain", "sft"):
        assert (tmp_path / "runs" / run / "final" / "image_vocab.json").exists()
    sft_vocab = json.loads((tmp_path / "runs/sft/final/image_vocab.json").read_text())
    pretrain_vocab = json.loads((tmp_path / "runs/pretrain/final/image_vocab.json").read_text())
    assert sft_vocab == pretrain_vocab  # the instruction-tuned bundle kept the pre-trained image vocabulary
    picture = Image.open(tmp_path / "bicycle.png")
    assert picture.size == (32, 32)
