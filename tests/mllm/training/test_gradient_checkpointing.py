"""train.gradient_checkpointing recomputes activations without changing the training: the same losses and weights
for conv and ViT tokenizers and for the llm stage, and a clear refusal for a model that cannot recompute."""

from __future__ import annotations

import pytest
import torch

from mllm.training.loop import run
from mllm.training.memory import enable_gradient_checkpointing
from mllm.training.recipe import load_recipe
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

TINY = ["model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "data.num_train=32",
        "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0", "train.steps=3"]
VIT = ["model.encoder=vit", "model.decoder=vit", "model.encoder_options={width: 16, depth: 2, num_heads: 2}",
       "model.decoder_options={width: 16, depth: 2, num_heads: 2}"]


@pytest.mark.parametrize("arch", ["conv", "vit"])
def test_tokenizer_losses_and_weights_are_unchanged(tmp_path, arch):
    extra = VIT if arch == "vit" else []
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        r = load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *TINY, *extra,
                                                         f"train.gradient_checkpointing={str(flag).lower()}"])
        runs[flag] = run(r)
    (plain, h0), (recomputed, h1) = runs[False], runs[True]
    assert [h["loss"] for h in h0] == pytest.approx([h["loss"] for h in h1], rel=1e-6)
    a, b = VisualTokenizer.from_pretrained(plain).state_dict(), VisualTokenizer.from_pretrained(recomputed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def saved_activation_bytes(model, pixel_values) -> int:
    """Bytes autograd keeps for the backward pass of one training forward."""
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(pixel_values).loss
    loss.backward()
    return sum(total)


def test_recomputation_keeps_fewer_activations_while_training_only():
    torch.manual_seed(0)
    model = VisualTokenizer(VisualTokenizerConfig(base_channels=16, latent_dim=8, codebook_size=16)).train()
    pixel_values = torch.rand(2, 3, 64, 64) * 2 - 1
    plain = saved_activation_bytes(model, pixel_values)
    enable_gradient_checkpointing(model)
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    recomputed = saved_activation_bytes(model, pixel_values)
    assert recomputed < 0.5 * plain, (recomputed, plain)
    model.eval()
    with torch.no_grad():
        assert model.encode(pixel_values).shape == (2, 8, 8)  # inference is unaffected


def test_llm_losses_and_gradients_are_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.model import shapes_vocabulary
    from mllm.text_tokenizers import build_word_tokenizer

    tokenizer = build_word_tokenizer(shapes_vocabulary())
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    llm.train()

    def loss_and_grads():
        llm.zero_grad()
        loss = llm(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in llm.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    enable_gradient_checkpointing(llm)
    assert llm.model.gradient_checkpointing and llm.config.use_cache is False
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert all(torch.allclose(plain_grads[k], grads[k], atol=1e-6) for k in grads)
    with pytest.raises(ValueError, match="cannot recompute"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
