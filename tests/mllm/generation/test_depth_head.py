"""Tests for mllm.generation.depth_head: all residual levels of a position from one hidden state, at toy sizes."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.generation.depth_head import DepthHeadModel

K, L, GRID = 8, 3, (2, 2)
N = GRID[0] * GRID[1]
BOS, BOI, CAPTION0 = 1, 3, 5  # toy vocabulary: 0 pad, 1 bos, 2 eos, 3 boi, 4 eoi, 5.. captions


def tiny_llm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))


def toy_levels(captions: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``(B, N, L)`` ids: level 0 is ``first`` (free), level 1 follows level 0 and the position, level 2 level 1 and
    the caption."""
    level1 = first + torch.arange(N)
    return torch.stack([first, level1, level1 // 2 + captions[:, None]], dim=-1)


def toy_batch(captions: torch.Tensor, first: torch.Tensor):
    """``[BOS, caption, BOI, N image positions]`` ids ``(B, 3 + N)`` and level ids ``(B, 3 + N, L)``."""
    batch = len(captions)
    prompt = torch.stack([torch.full_like(captions, BOS), captions + CAPTION0, torch.full_like(captions, BOI)], 1)
    input_ids = torch.cat([prompt, torch.zeros(batch, N, dtype=torch.long)], dim=1)
    level_ids = torch.cat([torch.full((batch, 3, L), -1), toy_levels(captions, first)], dim=1)
    return input_ids, level_ids


def random_first(batch: int, generator=None) -> torch.Tensor:
    return torch.randint(0, 2, (batch, N), generator=generator) * 4  # level 0 is 0 or 4, a fair coin


def test_shapes_and_loss_parts():
    model = DepthHeadModel(tiny_llm(), L, K)
    input_ids, level_ids = toy_batch(torch.tensor([0, 3]), random_first(2))
    out = model(input_ids, level_ids)
    assert out.level_logits.shape == (2 * N, L, K)
    assert out.level_losses.shape == (L,)
    # 2 text targets per row (caption, <boi>) and N image targets; the image loss sums the levels
    expected = (out.text_loss * 2 * 2 + out.image_loss * 2 * N) / (2 * (2 + N))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.image_loss, out.level_losses.sum())
    labels = input_ids.clone()
    labels[:, :3] = -100  # loss on the image only
    image_only = model(input_ids, level_ids, labels=labels)
    torch.testing.assert_close(image_only.loss, out.image_loss)


def test_training_learns_levels_that_depend_on_earlier_levels():
    model = DepthHeadModel(tiny_llm(), L, K)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        captions = torch.randint(0, 5, (16,), generator=generator)
        out = model(*toy_batch(captions, random_first(16, generator)))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.level_losses)
    first, last = losses[0], torch.stack(losses[-5:]).mean(0)
    assert (last[1:] < 0.05).all() and (last[1:] < first[1:] / 20).all()  # determined levels: learned
    assert abs(float(last[0]) - 0.693) < 0.1  # the free level stays a coin flip (ln 2)
    model.eval()
    captions = torch.arange(5).repeat(4)
    input_ids, _ = toy_batch(captions, random_first(20))
    torch.manual_seed(1)
    ids = model.generate_image(input_ids[:, :3], GRID, temperature=0.5)  # sampled
    assert ids.shape == (20, N, L)
    follows = (ids == toy_levels(captions, ids[..., 0])).all(dim=-1)  # later levels follow the sampled level 0
    assert follows.float().mean() > 0.95
    assert set(ids[..., 0].unique().tolist()) == {0, 4}


def test_generation_matches_teacher_forcing_with_left_padding():
    model = DepthHeadModel(tiny_llm(1), L, K, depth_layers=2).eval()
    prompts = torch.tensor([[0, 0, BOS, 6, BOI], [BOS, 7, 8, 9, BOI]])
    mask = (prompts != 0).long()
    ids = model.generate_image(prompts, GRID, attention_mask=mask, do_sample=False)
    assert ids.shape == (2, N, L) and 0 <= int(ids.min()) and int(ids.max()) < K
    input_ids = torch.cat([prompts, torch.zeros(2, N, dtype=torch.long)], dim=1)
    level_ids = torch.cat([torch.full((2, 5, L), -1), ids], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, N, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids, level_ids, attention_mask=full_mask)
    assert torch.equal(out.level_logits.argmax(-1), ids.reshape(-1, L))  # greedy = argmax of teacher forcing
    assert model.generate_image(prompts[1], N, do_sample=False).shape == (N, L)


def test_state_dict_and_save_round_trip(tmp_path):
    model = DepthHeadModel(tiny_llm(2), L, K).eval()
    with torch.no_grad():
        model.depth_head.level_position.normal_()  # not the initial value, so the round trip is not vacuous
    input_ids, level_ids = toy_batch(torch.tensor([1, 2]), random_first(2))
    reference = model(input_ids, level_ids).loss
    copy = DepthHeadModel(tiny_llm(3), L, K).eval()
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(input_ids, level_ids).loss, reference)
    model.save_pretrained(tmp_path)
    loaded = DepthHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids, level_ids).loss, reference)
    prompt = input_ids[:, :3]
    assert torch.equal(loaded.generate_image(prompt, GRID, do_sample=False),
                       model.generate_image(prompt, GRID, do_sample=False))


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        DepthHeadModel(tiny_llm(), 0, K)


def test_depth_head_stage_builds_batches_trains_and_saves(tmp_path):
    from transformers import AutoTokenizer

    from mllm.generation.depth_head import SPAN_NAME
    from mllm.training.recipe import DataRecipe, Recipe, TrainRecipe
    from mllm.training.stages.depth_head import build_depth_head_stage
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                          residual_levels=2, kmeans_init=False)).save_pretrained(tmp_path / "vt")
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4)
    recipe = Recipe(stage="llm", output_dir=str(tmp_path / "out"), visual_tokenizer=str(tmp_path / "vt"),
                    model={"config": llama, "depth_head": {"depth_layers": 1}},
                    data=DataRecipe(image_size=16, num_train=8, prompt_dropout=0.5),
                    train=TrainRecipe(batch_size=4))
    stage = build_depth_head_stage(recipe)
    batch = stage.batch_for_step(0, 0, 1)
    assert batch["level_ids"].shape[:2] == batch["input_ids"].shape and batch["level_ids"].shape[2] == 2
    image_positions = (batch["level_ids"][..., 0] >= 0).sum(dim=1)
    assert (image_positions == 4).all()  # one 2x2 image per sample, one position per image position
    assert torch.equal(stage.batch_for_step(0, 0, 1)["input_ids"], batch["input_ids"])  # rebuilt from (seed, step)
    loss, metrics = stage.loss_fn(stage.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and "text_loss" in metrics
    stage.save_fn(stage.model, str(tmp_path / "final"))
    loaded = DepthHeadModel.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / SPAN_NAME).is_file()
    prompt = tokenizer("draw: a red circle")["input_ids"] + [tokenizer.convert_tokens_to_ids("<boi>")]
    ids = loaded.generate_image(torch.tensor(prompt), 4)
    assert ids.shape == (4, 2) and int(ids.max()) < 16


def test_depth_head_stage_refuses_other_tasks(tmp_path):
    from mllm.training.recipe import DataRecipe, Recipe
    from mllm.training.stages.depth_head import build_depth_head_stage

    recipe = Recipe(stage="llm", output_dir=str(tmp_path), visual_tokenizer="unused", model={"depth_head": True},
                    data=DataRecipe(tasks={"decompression": 1.0}))
    with pytest.raises(ValueError, match="decompression"):
        build_depth_head_stage(recipe)
