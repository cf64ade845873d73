"""The loop's numerics: fused AdamW where it applies, and ``train.mixed_precision``."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mllm.training.loop import Trainer, build_stage, run
from mllm.training.optim import adamw, fused_supported, mixed_precision_context
from mllm.training.recipe import load_recipe

from tests.mllm.training.test_loop import tokenizer_recipe


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _train(model, optimizer, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_is_fused_on_plain_cpu_parameters_and_takes_the_same_steps_as_the_default():
    fused_model, plain_model = _model(), _model()
    options = dict(lr=0.01, betas=[0.9, 0.95], weight_decay=0.1)
    fused = adamw(list(fused_model.parameters()), **options)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["betas"] == (0.9, 0.95)
    _train(fused_model, fused)
    _train(plain_model, plain)
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did train


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_checkpoint_of_either_adamw_resumes_into_the_other(saved_fused):
    def make(model, fused):
        return (adamw(list(model.parameters()), lr=0.01, betas=(0.9, 0.999), weight_decay=0.01) if fused
                else torch.optim.AdamW(model.parameters(), lr=0.01))
    a, b = _model(), _model()
    saved = make(a, saved_fused)
    _train(a, saved)
    resumed = make(b, not saved_fused)
    b.load_state_dict(a.state_dict())
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))  # a copy, as a checkpoint holds
    _train(a, saved, 3)
    _train(b, resumed, 3)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_fused_adamw_is_left_out_for_sharded_integer_or_mixed_device_parameters():
    params = list(_model().parameters())
    assert fused_supported(params)
    assert not fused_supported(params, sharded=True)
    assert not fused_supported([])
    assert not fused_supported(params + [torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)])
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert not fused_supported(params + [meta])
    assert adamw(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, sharded=True).param_groups[0]["fused"] is None
    assert adamw(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, fused=False).param_groups[0]["fused"] is None


def test_train_fused_optimizer_false_gives_the_loop_torchs_for_loop_adamw(tmp_path):
    for value, fused in (("true", True), ("false", None)):
        recipe = tokenizer_recipe(tmp_path / value, f"train.fused_optimizer={value}", "train.steps=1")
        assert Trainer(recipe, build_stage(recipe)).optimizer.optimizer.param_groups[0]["fused"] is fused


def test_mixed_precision_is_validated_when_the_recipe_loads(tmp_path):
    assert tokenizer_recipe(tmp_path, "train.mixed_precision=bf16").train.mixed_precision == "bf16"
    assert tokenizer_recipe(tmp_path, "train.mixed_precision=no").train.mixed_precision == "no"  # YAML's false
    assert tokenizer_recipe(tmp_path).train.mixed_precision is None
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        tokenizer_recipe(tmp_path, "train.mixed_precision=fp16")


def test_bf16_autocasts_the_forward_unless_the_launch_config_already_does_and_refuses_a_mismatch():
    cpu = torch.device("cpu")
    plain = SimpleNamespace(mixed_precision="no", device=cpu)
    with mixed_precision_context(plain, "bf16")():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16
    for value in (None, "no"):
        with mixed_precision_context(plain, value)():
            assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.float32
    launched = SimpleNamespace(mixed_precision="bf16", device=cpu)
    with mixed_precision_context(launched, "bf16")():  # accelerate's own autocast does it: nothing added
        assert not torch.is_autocast_enabled("cpu")
    for config, asked in (("bf16", "no"), ("fp16", "bf16")):
        with pytest.raises(ValueError, match=f"train.mixed_precision is '{asked}' but the accelerate launch config "
                                             f"runs '{config}'"):
            mixed_precision_context(SimpleNamespace(mixed_precision=config, device=cpu), asked)


def test_a_bf16_llm_stage_runs_its_forward_in_bf16_and_keeps_float32_weights(tmp_path):
    tok_path, _ = run(tokenizer_recipe(tmp_path / "tok", "train.steps=2"))
    recipe = load_recipe("recipes/demo_llm.yaml", [
        f"output_dir={tmp_path / 'llm'}", f"visual_tokenizer={tok_path}", "data.num_train=32", "train.steps=3",
        "train.batch_size=8", "train.warmup_steps=0", "train.mixed_precision=bf16", "train.save_every=0",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1"])
    trainer = Trainer(recipe, build_stage(recipe))
    seen = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    history = trainer.train()
    hook.remove()
    assert seen == [torch.bfloat16] * 3 and len(history) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert trainer.optimizer.optimizer.param_groups[0]["fused"] is True
