"""The loop's accumulation, EMA, finished-run and log handling: N micro-batches of B equal one batch of N*B, the EMA
copy is what final/ holds and resumes exactly, a finished recipe is not retrained, a resumed log has each step once."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed

from mllm.training.loop import Trainer, build_stage, run, split_batch
from mllm.training.recipe import load_recipe
from tokenizer_bridge import VisualTokenizer

# an FSQ tokenizer: no codebook statistics written inside forward, so micro-batches and one batch see the same math
TINY = ["model.base_channels=8", "model.latent_dim=2", "model.quantizer={type: fsq, levels: [4, 4]}",
        "data.num_train=32", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0", "train.lr=0.01"]


def recipe(out, *extra):
    return load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={out}", *TINY, *extra])


def weights(path):
    return VisualTokenizer.from_pretrained(path).state_dict()


def first_step_gradients(out, accumulation: int) -> dict:
    """The gradients the optimizer steps with at step 0 (captured when accelerate lets the step through)."""
    r = recipe(out, "train.steps=1", f"train.gradient_accumulation_steps={accumulation}", "train.grad_clip=0")
    stage, trainer, captured = capturing_trainer(r)
    trainer.optimizer_step(stage.batch_for_step(0, 0, 1))
    return captured


def capturing_trainer(r):
    """(stage, trainer, gradients dict filled when accelerate lets the optimizer step through) of recipe ``r``."""
    set_seed(r.train.seed)  # the same initial weights for every run compared
    stage = build_stage(r)
    trainer = Trainer(r, stage)
    captured, real_step = {}, trainer.optimizer.step

    def capture(*args, **kwargs):
        if trainer.accelerator.sync_gradients:
            captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = capture
    return stage, trainer, captured


def test_micro_batches_sum_to_the_gradient_of_the_whole_batch(tmp_path):
    whole, micro = first_step_gradients(tmp_path / "one", 1), first_step_gradients(tmp_path / "four", 4)
    assert set(whole) == set(micro) and len(whole) > 10
    scale = max(g.abs().max().item() for g in whole.values())
    assert all(torch.allclose(whole[k], micro[k], atol=1e-5 * scale, rtol=1e-4) for k in whole)
    # whole runs: the same losses step by step (Adam turns float noise in zero-gradient biases into +-lr steps, so
    # weights are compared through their gradients above, not bit for bit)
    _, h1 = run(recipe(tmp_path / "run1", "train.steps=4"))
    _, h4 = run(recipe(tmp_path / "run4", "train.steps=4", "train.gradient_accumulation_steps=4"))
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h4], rel=1e-3)
    with pytest.raises(ValueError, match="fewer than train.gradient_accumulation_steps"):
        run(recipe(tmp_path / "bad", "train.steps=1", "train.gradient_accumulation_steps=16"))


def test_split_batch_cuts_rows_and_keeps_scalars_once():
    batch = {"pixel_values": torch.arange(10).view(5, 2), "num_skipped": torch.tensor(3)}
    parts = split_batch(batch, 2)
    assert [p["pixel_values"].shape[0] for p in parts] == [3, 2]
    assert int(parts[0]["num_skipped"]) == 3 and "num_skipped" not in parts[1]
    assert torch.equal(torch.cat([p["pixel_values"] for p in parts]), batch["pixel_values"])


def test_ema_weights_are_final_and_resume_exactly(tmp_path, run_until_first_checkpoint):
    full, _ = run(recipe(tmp_path / "full", "train.steps=6", "train.ema_decay=0.9"))
    raw, averaged = weights(str(full) + "-raw"), weights(full)
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # the average lags the trained weights
    run_until_first_checkpoint(
        lambda: run(recipe(tmp_path / "cut", "train.steps=6", "train.ema_decay=0.9", "train.save_every=3")))
    assert (tmp_path / "cut" / "checkpoint-3" / "ema_model" / "model.safetensors").exists()
    _, history = run(recipe(tmp_path / "cut", "train.steps=6", "train.ema_decay=0.9", "train.save_every=3"))
    assert [h["step"] for h in history] == [4, 5, 6]
    resumed = weights(tmp_path / "cut" / "final")
    assert all(torch.equal(averaged[k], resumed[k]) for k in averaged)


def test_a_finished_run_is_not_trained_again_and_the_log_has_each_step_once(tmp_path, monkeypatch):
    original = Trainer.save_checkpoint
    calls = {"n": 0}

    def crash_on_second(self):  # checkpoint at step 2, crash while saving the one at step 4 (steps 3-4 logged)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(recipe(tmp_path, "train.steps=6", "train.save_every=2"))
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert [json.loads(x)["step"] for x in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4]
    final, history = run(recipe(tmp_path, "train.steps=6", "train.save_every=2"))
    assert [h["step"] for h in history] == [3, 4, 5, 6]
    assert [json.loads(x)["step"] for x in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    before = weights(final)
    again, history = run(recipe(tmp_path, "train.steps=6", "train.save_every=2"))
    assert again == final and history == []
    assert all(torch.equal(before[k], weights(final)[k]) for k in before)
    _, longer = run(recipe(tmp_path, "train.steps=8", "train.save_every=2"))  # another recipe: from checkpoint-4
    assert [h["step"] for h in longer] == [5, 6, 7, 8]
    assert [json.loads(x)["step"] for x in open(tmp_path / "log.jsonl")] == list(range(1, 9))


class _Planted:
    """A pickle that writes a marker file when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_hold_no_pickle_the_loop_loads(tmp_path, run_until_first_checkpoint):
    # issue 15, defect 2: the scheduler is replayed from the step, never unpickled; a custom_checkpoint file in state/
    # (earlier versions saved the scheduler so; accelerate loads it with weights_only=False) is set aside unopened
    import pickle

    run_until_first_checkpoint(lambda: run(recipe(tmp_path, "train.steps=4", "train.save_every=2")))
    state = tmp_path / "checkpoint-2" / "state"
    assert not list(state.glob("custom_checkpoint_*"))
    marker = tmp_path / "code-ran"
    (state / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    _, history = run(recipe(tmp_path, "train.steps=4", "train.save_every=2"))
    assert [h["step"] for h in history] == [3, 4] and not marker.exists()
    assert (state / "custom_checkpoint_0.pkl.ignored").exists()  # a checkpoint of an earlier version still resumes
    full, _ = run(recipe(tmp_path / "full", "train.steps=4", "train.save_every=0"))
    a, b = weights(full), weights(tmp_path / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the replayed schedule resumes exactly


TINY_LLM = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
            "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2"]


@pytest.fixture(scope="module")
def llm_tokenizer_path(tmp_path_factory):
    from tokenizer_bridge import VisualTokenizerConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vt")
    VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                          image_size=32)).save_pretrained(path)
    return path


def llm_step_gradients(out, vt, accumulation: int, *extra) -> tuple[dict, float]:
    """(gradients of the first optimizer step, its logged loss) of the llm stage with ``accumulation`` micro-batches."""
    r = load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={out}", f"visual_tokenizer={vt}", "data.num_train=32", "train.batch_size=8", "train.steps=1",
        "train.warmup_steps=0", "train.grad_clip=0", f"train.gradient_accumulation_steps={accumulation}",
        "data.tasks={captioning: 1.0, text_to_image: 1.0, interleaved: 0.5}", *TINY_LLM, *extra])
    stage, trainer, captured = capturing_trainer(r)
    batch = stage.batch_for_step(0, 0, 1)
    lengths = (batch["labels"][:, 1:] != -100).sum(1)
    assert lengths.unique().numel() > 1  # micro-batches hold different numbers of target tokens
    loss, _ = trainer.optimizer_step(batch)
    return captured, float(loss)


@pytest.mark.parametrize("weights", [[], ["train.image_loss_weight=0.5"]])
def test_llm_micro_batches_with_unequal_token_counts_give_the_whole_batch_gradient(tmp_path, llm_tokenizer_path,
                                                                                   weights):
    whole, loss1 = llm_step_gradients(tmp_path / "one", llm_tokenizer_path, 1, *weights)
    micro, loss4 = llm_step_gradients(tmp_path / "four", llm_tokenizer_path, 4, *weights)
    assert set(whole) == set(micro) and len(whole) > 5
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert loss4 == pytest.approx(loss1, rel=1e-5)  # the logged loss is the whole batch's token mean too
