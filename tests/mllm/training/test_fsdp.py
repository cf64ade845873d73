"""FSDP (version 2) through the one training loop.

Fast: the pieces of the FSDP save path on their own: the parameter-free skeleton kept from before sharding, the whole
model rebuilt from a full state dict (ties, dtypes, clear errors), and the refusal of an FSDP launch that accelerate
did not turn into FSDP.

Slow: real runs under ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` on CPU processes. accelerate
enables FSDP only when it finds GPUs (on CPUs it silently sets up plain processes), so the worker below builds its
``Accelerator(cpu=True)`` (gloo process group) and switches the state to FSDP with the plugin accelerate launch
configured from the YAML file; from there ``accelerator.prepare`` (``fully_shard`` per decoder layer), the gathered
save, ``save_state`` / ``load_state`` and the loop are the code a GPU run executes.

This file is also the worker: ``accelerate launch ... tests/mllm/training/test_fsdp.py --worker RECIPE [overrides ...]``.
"""

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_distributed import (  # noqa: F401 (fixtures)
    assert_same_weights,
    launch,
    llm_overrides,
    log_losses,
    reference,
    visual_tokenizer,
)
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.training.parallel import check_fsdp, meta_copy, model_from_state_dict


def tiny_llama(tied: bool, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("tied", [False, True])
def test_model_from_state_dict_rebuilds_a_whole_model(tmp_path, tied):
    model = tiny_llama(tied)
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert (skeleton.lm_head.weight is skeleton.model.embed_tokens.weight) == tied
    assert not any(p.is_meta for p in model.parameters())  # the original is untouched

    state = {k: v + 1.0 for k, v in model.state_dict().items()}  # "trained" weights, as gathered from the shards
    if tied:
        del state["lm_head.weight"]  # one name of a tied group is enough
    whole = model_from_state_dict(skeleton, state)
    assert not any(t.is_meta for t in [*whole.parameters(), *whole.buffers()])
    for name, value in whole.state_dict().items():
        expected = state.get(name, state.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert (whole.lm_head.weight is whole.model.embed_tokens.weight) == tied
    assert all(p.is_meta for p in skeleton.parameters())  # reusable for the next checkpoint

    whole.save_pretrained(tmp_path)  # a vanilla checkpoint that reloads with the same logits
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, whole(ids).logits)


def test_model_from_state_dict_keeps_the_stage_dtypes():
    model = tiny_llama(False, torch.bfloat16)
    state = {k: v.float() for k, v in model.state_dict().items()}  # FSDP upcasts trainable parameters to float32
    whole = model_from_state_dict(meta_copy(model), state)
    assert {p.dtype for p in whole.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(whole.model.norm.weight, model.model.norm.weight, rtol=0, atol=0)


def test_model_from_state_dict_errors_name_the_problem():
    model = tiny_llama(False)
    skeleton, state = meta_copy(model), model.state_dict()
    with pytest.raises(ValueError, match="does not have: \\['model.extra'\\]"):
        model_from_state_dict(skeleton, {**state, "model.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks 1 tensor.*lm_head.weight"):
        model_from_state_dict(skeleton, {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(3,\\)"):
        model_from_state_dict(skeleton, {**state, "model.norm.weight": torch.ones(3)})


def test_fsdp_that_accelerate_did_not_enable_is_refused(monkeypatch):
    cpu = torch.device("cpu")
    plain = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device=cpu)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_fsdp(plain)  # no FSDP asked for: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="accelerate enables FSDP only on GPUs.*ddp_cpu.yaml"):
        check_fsdp(plain)
    with pytest.raises(RuntimeError, match="set up MULTI_CPU with 2 process"):
        check_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, device=cpu))
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp(fsdp1)
    fsdp1.state.fsdp_plugin.fsdp_version = 2
    check_fsdp(fsdp1)


def test_fsdp_refuses_the_tokenizer_stage(tmp_path):
    from mllm.training.loop import Trainer
    from mllm.training.recipe import load_recipe
    from mllm.training.stage import Stage

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    recipe = load_recipe("recipes/tokenizer_conv_vq.yaml", [f"output_dir={tmp_path}"])
    stage = Stage(torch.nn.Linear(2, 2), lambda *a: {}, lambda *a: None, lambda *a: None)
    with pytest.raises(ValueError, match="FSDP cannot train the tokenizer stage.*ddp_cpu.yaml"):
        Trainer(recipe, stage, fsdp)


# ------------------------------------------------------------------------------------------ runs on CPU processes
def launch_fsdp(processes: int, overrides: list[str]) -> None:
    launch("fsdp", ["--num_processes", str(processes), "tests/mllm/training/test_fsdp.py", "--worker", "recipes/demo_llm.yaml",
                    *overrides], {"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_fsdp_one_process_matches_plain_run(tmp_path, visual_tokenizer, reference):  # noqa: F811
    out = tmp_path / "fsdp"
    launch_fsdp(1, llm_overrides(out, visual_tokenizer, "train.save_every=2"))
    assert log_losses(out) == pytest.approx(log_losses(reference / "full"), rel=1e-5)
    assert_same_weights(out / "final", reference / "full" / "final")

    from transformers import AutoModelForCausalLM

    from mllm.bundle.bundle import load_bundle

    checkpoint = out / "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")  # the gathered weights as a vanilla HF model
    _, processor = load_bundle(checkpoint / "model")
    assert model.get_input_embeddings().weight.shape[0] >= processor.image_vocab.id_range[1]
    state = sorted(p.name for p in (checkpoint / "state").iterdir())
    assert "pytorch_model_fsdp_0" in state and "optimizer_0" in state  # sharded (DCP) model + optimizer state


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp_and_resume_exactly(tmp_path, visual_tokenizer):  # noqa: F811
    fsdp, cut, ddp = tmp_path / "fsdp", tmp_path / "cut", tmp_path / "ddp"
    lora = ["lora.enabled=true", "lora.r=4"]  # LoRA + trainable new token rows: frozen and trained weights mixed
    launch_fsdp(2, llm_overrides(fsdp, visual_tokenizer, *lora, "train.save_every=2"))
    ranks = [json.loads((fsdp / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:  # every parameter was a DTensor holding about half of its values on each rank
        assert rank["world"] == 2 and rank["dtensors"] == rank["params"] > 0
        assert rank["local"] < 0.6 * rank["full"]
    assert sum(r["local"] for r in ranks) == ranks[0]["full"]

    # sharding changes nothing in the arithmetic: the same curve and weights as data parallel over 2 processes
    launch("ddp_cpu", ["-m", "mllm.training.loop", "recipes/demo_llm.yaml", *llm_overrides(ddp, visual_tokenizer, *lora,
                                                                                 "train.save_every=0")],
           {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert log_losses(fsdp) == pytest.approx(log_losses(ddp), rel=1e-5)
    assert_same_weights(fsdp / "final", ddp / "final")
    assert (fsdp / "final" / "adapter" / "adapter_model.safetensors").exists()
    state = sorted(p.name for p in (fsdp / "checkpoint-2" / "state" / "optimizer_0").iterdir())
    assert state == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own optimizer shard

    cut.mkdir()  # an interrupted run: only its step-2 checkpoint survived
    shutil.copytree(fsdp / "checkpoint-2", cut / "checkpoint-2")
    launch_fsdp(2, llm_overrides(cut, visual_tokenizer, *lora, "train.save_every=2"))
    assert [json.loads(line)["step"] for line in open(cut / "log.jsonl")] == [3, 4]
    assert log_losses(cut) == pytest.approx(log_losses(fsdp)[2:], rel=1e-6)
    assert_same_weights(cut / "final", fsdp / "final", atol=1e-7)


def cpu_fsdp_accelerator():
    """An Accelerator on CPU processes (gloo) switched to the FSDP plugin that ``accelerate launch`` configured."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set from fsdp.yaml
    if accelerator.mixed_precision != "no":  # as accelerate's GPU set-up does
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2 and accelerator.num_processes == int(os.environ["WORLD_SIZE"])
    return accelerator


def worker(recipe_path: str, overrides: list[str]) -> None:
    """``mllm.training.loop.run`` under the FSDP accelerator; each rank then reports how its parameters are sharded."""
    from accelerate.utils import set_seed
    from torch.distributed.tensor import DTensor

    from mllm.training.loop import Trainer, build_stage
    from mllm.training.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    accelerator = cpu_fsdp_accelerator()
    set_seed(recipe.train.seed)  # as run() does
    trainer = Trainer(recipe, build_stage(recipe), accelerator)
    trainer.train()
    params = list(trainer.model.parameters())
    report = {"world": accelerator.num_processes, "params": len(params),
              "dtensors": sum(isinstance(p, DTensor) for p in params), "full": sum(p.numel() for p in params),
              "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)}
    Path(recipe.output_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3:])
