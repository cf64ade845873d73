"""lm_loss: plain CE when unweighted, hand-checked modality weights, the PaLM z-loss, chunking."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.training.losses import lm_loss


def random_batch(seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    labels[0, :2] = -100
    labels[1, 4:] = -100
    image = torch.zeros(2, 6, dtype=torch.bool)
    image[0, 3:5] = True
    image[1, 1] = True
    return logits, labels, image


def test_unweighted_loss_is_plain_shifted_cross_entropy():
    logits, labels, image = random_batch()
    loss, metrics = lm_loss(logits, labels, image)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert metrics["text_tokens"] + metrics["image_tokens"] == int((labels[:, 1:] != -100).sum())
    assert metrics["image_tokens"] == 3


def test_unweighted_loss_equals_the_models_own_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 20, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(lm_loss(out.logits, labels)[0], out.loss)


def test_modality_weights_hand_computed():
    # one row, vocab 2; positions 0,1,2 predict labels 1,2,3. CE of logits (a, b) for target 0 is log(1+e^(b-a)).
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 0, 1]])
    image = torch.tensor([[False, False, True, True]])
    ce = [math.log(2.0), math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0))]  # text, image, image
    loss, metrics = lm_loss(logits, labels, image, text_weight=1.0, image_weight=3.0)
    assert loss.item() == pytest.approx((ce[0] + 3 * ce[1] + 3 * ce[2]) / 7, rel=1e-6)
    assert metrics["text_loss"] == pytest.approx(ce[0], rel=1e-6)
    assert metrics["image_loss"] == pytest.approx((ce[1] + ce[2]) / 2, rel=1e-6)
    assert (metrics["text_tokens"], metrics["image_tokens"]) == (1, 2)
    no_image, _ = lm_loss(logits, labels, image, image_weight=0.0)
    assert no_image.item() == pytest.approx(ce[0], rel=1e-6)
    same, _ = lm_loss(logits, labels, image, text_weight=2.0, image_weight=2.0)  # normalised by the weighted count
    assert same.item() == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_z_loss_follows_the_palm_formula():
    logits, labels, image = random_batch(seed=1)
    base, _ = lm_loss(logits, labels, image)
    loss, metrics = lm_loss(logits, labels, image, z_loss_weight=1e-4)
    keep = labels[:, 1:] != -100
    log_z = torch.logsumexp(logits[:, :-1][keep], dim=-1)
    assert metrics["z_loss"] == pytest.approx((log_z**2).mean().item(), rel=1e-6)
    torch.testing.assert_close(loss, base + 1e-4 * (log_z**2).mean())


def test_chunked_log_partition_matches_in_value_and_gradient():
    logits, labels, image = random_batch(seed=2)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss_a, _ = lm_loss(a, labels, image, image_weight=2.0, z_loss_weight=1e-3)
    loss_b, _ = lm_loss(b, labels, image, image_weight=2.0, z_loss_weight=1e-3, chunk_size=2)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(a.grad, b.grad)


def test_no_targets_gives_zero_loss_with_a_graph():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss, metrics = lm_loss(logits, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and metrics["text_tokens"] == 0 and "text_loss" not in metrics
