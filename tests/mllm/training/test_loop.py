"""The one training loop: loss goes down, checkpoints resume exactly, the llm stage trains a bridged bundle."""

import json

import torch

from mllm.bundle.bundle import load_bundle
from mllm.training.loop import latest_checkpoint, run
from mllm.training.recipe import load_recipe
from mllm.training.stage import step_indices
from tokenizer_bridge import VisualTokenizer

TINY_TOKENIZER = [
    "model.base_channels=8", "model.latent_dim=8", "model.codebook_size=16", "data.num_train=64",
    "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0",
]


def tokenizer_recipe(out, *extra):
    return load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *TINY_TOKENIZER, *extra])


def test_step_indices_cover_an_epoch_and_are_reproducible():
    batches = [step_indices(s, 8, 32, seed=3) for s in range(4)]
    assert sorted(torch.cat(batches).tolist()) == list(range(32))
    assert torch.equal(step_indices(2, 8, 32, seed=3), batches[2])
    assert not torch.equal(step_indices(4, 8, 32, seed=3), batches[0])  # next epoch, new permutation


def test_tokenizer_stage_lowers_loss_and_logs(tmp_path):
    path, history = run(tokenizer_recipe(tmp_path, "train.steps=60", "train.lr=0.003"))
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.9 * first
    assert sum(h["psnr"] for h in history[-5:]) / 5 > sum(h["psnr"] for h in history[:5]) / 5 + 1.0
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 61)) and "psnr" in log[0]
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_resume_continues_exactly(tmp_path, run_until_first_checkpoint):
    full, _ = run(tokenizer_recipe(tmp_path / "full", "train.steps=6", "train.save_every=0"))

    # the same recipe, killed right after its step-3 checkpoint
    run_until_first_checkpoint(lambda: run(tokenizer_recipe(tmp_path / "cut", "train.steps=6", "train.save_every=3")))
    assert latest_checkpoint(str(tmp_path / "cut"))[0] == 3 and not (tmp_path / "cut" / "final").exists()

    _, history = run(tokenizer_recipe(tmp_path / "cut", "train.steps=6", "train.save_every=3"))
    assert [h["step"] for h in history] == [4, 5, 6]
    a = VisualTokenizer.from_pretrained(full).state_dict()
    b = VisualTokenizer.from_pretrained(tmp_path / "cut" / "final").state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_llm_stage_trains_and_saves_a_bundle(tmp_path):
    tok_path, _ = run(tokenizer_recipe(tmp_path / "tok", "train.steps=2"))
    recipe = load_recipe(
        "recipes/demo_llm.yaml",
        [f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tok_path}", "data.num_train=64", "train.steps=60",
         "train.batch_size=8", "train.warmup_steps=0", "train.lr=0.003", "train.log_every=5",
         "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1"],
    )
    path, history = run(recipe)
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.8 * first
    model, processor = load_bundle(path)
    assert processor.image_vocab.grid_size == [4, 4] and processor.image_vocab.codebook_size == 16
    assert model.get_input_embeddings().weight.shape[0] >= processor.image_vocab.id_range[1]


def test_tokenizer_stage_trains_a_slot_tokenizer_by_model_type(tmp_path):
    from tokenizer_bridge import SlotTokenizer

    recipe = load_recipe("recipes/tokenizer_conv_vq.yaml", [
        f"output_dir={tmp_path}", "data.num_train=32", "train.batch_size=8", "train.steps=3", "train.save_every=0",
        "model={model_type: slot_tokenizer, num_slots: 4, latent_dim: 16, codebook_size: 16, base_channels: 8}",
    ])
    path, history = run(recipe)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    loaded = SlotTokenizer.from_pretrained(path)
    assert loaded.encode(torch.rand(2, 3, 32, 32) * 2 - 1).shape[:2] == (2, 4)
