"""LoRA via PEFT on a bridged LLM: only adapters + new token rows train, the adapter is small, the merged bundle is a
vanilla causal LM with the PEFT model's logits, and an interrupted LoRA run resumes exactly."""

import copy
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mllm.bundle.bundle import load_bundle
from mllm.lora import ADAPTER_DIR, is_tied, new_token_ids, save_lora_bundle, wrap_lora
from mllm.model import bridge
from mllm.training.loop import latest_checkpoint, run
from mllm.training.recipe import LoraRecipe, load_recipe, recipe_from_dict
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

HIDDEN = 32
TINY_LLM = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
LORA = LoraRecipe(enabled=True, r=4, alpha=8)


def tiny_visual_tokenizer() -> VisualTokenizer:
    torch.manual_seed(0)
    return VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                                 image_size=32)).eval()


def bridged(tied: bool):
    """(bridged tiny Llama, processor); 16 image ids + 3 specials on a word-level text vocabulary."""
    torch.manual_seed(0)
    return bridge({"config": {**TINY_LLM, "tie_word_embeddings": tied}}, tiny_visual_tokenizer(), 32)


def effective_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The (embedding, head) matrices the PEFT model computes with (trained rows swapped in)."""
    embed = model.get_input_embeddings().token_adapter.get_merged_weights(["default"])
    head = model.get_output_embeddings().token_adapter.get_merged_weights(["default"])
    return embed.detach().clone(), head.detach().clone()


def train_steps(model, vocab, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    start, end = vocab.id_range
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        text = torch.randint(0, vocab.text_vocab_size, (4, 6), generator=g)
        image = torch.randint(start, end, (4, 6), generator=g)
        ids = torch.cat([text, torch.full((4, 1), vocab.boi_token_id), image], dim=1)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_trains_only_adapters_and_new_rows(tied):
    model, processor = bridged(tied)
    vocab = processor.image_vocab
    assert is_tied(model) == tied
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = wrap_lora(model, LORA, vocab)

    new = new_token_ids(vocab)
    assert new == sorted(vocab.special_token_ids + list(range(*vocab.id_range))) and len(new) == 19
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == lora + len(new) * HIDDEN * (1 if tied else 2)  # tied: one set of rows serves both

    embed0, head0 = effective_rows(peft_model)
    train_steps(peft_model, vocab)
    embed1, head1 = effective_rows(peft_model)
    text = vocab.text_vocab_size
    torch.testing.assert_close(embed1[:text], embed0[:text], rtol=0, atol=0)
    torch.testing.assert_close(head1[:text], head0[:text], rtol=0, atol=0)
    assert (embed1[new] - embed0[new]).abs().amax(dim=1).min() > 0  # every new row moved
    assert (head1[new] - head0[new]).abs().amax(dim=1).min() > 0
    if tied:
        torch.testing.assert_close(embed1, head1, rtol=0, atol=0)
    frozen = peft_model.get_base_model().state_dict()
    for name, value in base.items():  # the wrapped base layers themselves never change
        key = next(k for k in frozen if k.replace(".base_layer", "").replace(".token_adapter", "") == name)
        torch.testing.assert_close(frozen[key], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merged_bundle_and_adapter_reproduce_the_peft_model(tmp_path, tied):
    model, processor = bridged(tied)
    base = copy.deepcopy(model)
    peft_model = wrap_lora(model, LORA, processor.image_vocab)
    train_steps(peft_model, processor.image_vocab)
    peft_model.eval()
    save_lora_bundle(tmp_path / "bundle", peft_model, processor)

    ids = torch.tensor([[1, 5, 7, processor.image_vocab.boi_token_id, *range(*processor.image_vocab.id_range)]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged, _ = load_bundle(tmp_path / "bundle")
        assert type(merged).__name__ == "LlamaForCausalLM" and not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bundle").eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "bundle" / ADAPTER_DIR).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    # the adapter holds LoRA matrices + the new rows only, never the full vocab x hidden matrices
    adapter = tmp_path / "bundle" / ADAPTER_DIR / "adapter_model.safetensors"
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    rows = len(new_token_ids(processor.image_vocab)) * HIDDEN * (1 if tied else 2)
    payload = 4 * (lora + rows)
    assert payload <= os.path.getsize(adapter) <= payload + 4096  # + safetensors header
    full_vocab = model.get_input_embeddings().weight.numel() * 4
    assert os.path.getsize(adapter) < payload + full_vocab / 2


def test_lora_recipe_section_is_typed():
    values = {"stage": "llm", "output_dir": "x", "visual_tokenizer": "vt", "lora": {"enabled": True, "r": 8}}
    recipe = recipe_from_dict(values)
    assert recipe.lora == LoraRecipe(enabled=True, r=8)
    with pytest.raises(ValueError, match="unknown recipe key.*rank.*lora"):
        recipe_from_dict({**values, "lora": {"rank": 8}})
    with pytest.raises(ValueError, match="llm stage only"):
        recipe_from_dict({"stage": "tokenizer", "output_dir": "x", "lora": {"enabled": True}})


def lora_recipe(out, vt_path, *extra):
    return load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={out}", f"visual_tokenizer={vt_path}", "data.num_train=16", "train.batch_size=4",
        "train.steps=4", "train.warmup_steps=0", "train.lr=0.01", "train.log_every=1", "lora.enabled=true",
        "lora.r=4", *(f"model.config.{k}={v}" for k, v in TINY_LLM.items()), *extra,
    ])


def test_lora_run_resumes_exactly_and_saves_bundle_plus_adapter(tmp_path, run_until_first_checkpoint):
    vt_path = tmp_path / "vt"
    tiny_visual_tokenizer().save_pretrained(vt_path)
    full, history = run(lora_recipe(tmp_path / "full", vt_path, "train.save_every=0"))

    run_until_first_checkpoint(lambda: run(lora_recipe(tmp_path / "cut", vt_path, "train.save_every=2")))
    step, checkpoint = latest_checkpoint(str(tmp_path / "cut"))
    assert step == 2 and os.path.exists(os.path.join(checkpoint, "model", ADAPTER_DIR, "adapter_config.json"))
    load_bundle(os.path.join(checkpoint, "model"))  # a checkpoint's model is a usable bundle

    _, resumed = run(lora_recipe(tmp_path / "cut", vt_path, "train.save_every=2"))
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in history[2:]], rel=1e-6)
    a, _ = load_bundle(full)
    b, _ = load_bundle(tmp_path / "cut" / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    assert (tmp_path / "cut" / "final" / ADAPTER_DIR / "adapter_model.safetensors").exists()
