"""The one training loop under the accelerate configs in ``recipes/accelerate/`` (slow; CPU only, so it runs in CI).

- DeepSpeed ZeRO-2 / ZeRO-3, one process (``DS_ACCELERATOR=cpu``) through ``accelerate launch -m mllm.train``: the loss
  curve and the final weights match a run without DeepSpeed, checkpoints are bundles, and a ZeRO-3 LoRA run resumed
  from its checkpoint ends where the uninterrupted run ends.
- DDP with two CPU processes: ranks see disjoint shards of every global batch and end with identical weights; two
  micro-batches per rank give the same run as one. ZeRO-2 with 4 micro-batches equals one batch of 4.

On CPU accelerate can run DeepSpeed with one process only (with more it treats the run as non-distributed), so that
path needs GPUs; it never enables FSDP on CPU either (``tests/mllm/training/test_fsdp.py`` switches it on itself). The first DeepSpeed run compiles a communication op (~35 s, several minutes
on a busy machine), cached in ``build/torch_extensions`` (git-ignored).

This file is also the worker of the DDP test: ``accelerate launch tests/mllm/training/test_distributed.py --worker OUT RECIPE ...``.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TINY_LLM = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
            "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2"]


def llm_overrides(out, vt_path, *extra) -> list[str]:
    return [f"output_dir={out}", f"visual_tokenizer={vt_path}", "data.num_train=32", "train.batch_size=4",
            "train.steps=4", "train.warmup_steps=0", "train.lr=0.01", "train.log_every=1", *TINY_LLM, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: list[str], env: dict, timeout: int = 400) -> None:
    cmd = [ACCELERATE, "launch", "--config_file", f"recipes/accelerate/{config}.yaml", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def deepspeed_env() -> dict:
    extensions = ROOT / "build" / "torch_extensions"  # compiled comm op cached across runs
    return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1"}


def log_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "log.jsonl")]


def weights(bundle: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(bundle / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=atol, msg=name)


@pytest.fixture(scope="module")
def visual_tokenizer(tmp_path_factory):
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vt")
    config = VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8, image_size=32)
    VisualTokenizer(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, visual_tokenizer):
    """Single-process, no-DeepSpeed LoRA and full runs to compare every distributed run with."""
    from mllm.training.loop import run
    from mllm.training.recipe import load_recipe

    root = tmp_path_factory.mktemp("reference")
    for name, extra in (("full", []), ("lora", ["lora.enabled=true", "lora.r=4"])):
        run(load_recipe("recipes/demo_llm.yaml", llm_overrides(root / name, visual_tokenizer, "train.save_every=0",
                                                               *extra)))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_one_process_matches_plain_run(tmp_path, visual_tokenizer, reference, zero):
    out = tmp_path / zero
    launch(f"deepspeed_{zero}", ["--num_processes", "1", "-m", "mllm.training.loop", "recipes/demo_llm.yaml",
                                 *llm_overrides(out, visual_tokenizer, "train.save_every=2")], deepspeed_env())
    assert log_losses(out) == pytest.approx(log_losses(reference / "full"), rel=1e-5)
    assert_same_weights(out / "final", reference / "full" / "final")

    from mllm.bundle.bundle import load_bundle

    model, processor = load_bundle(out / "checkpoint-2" / "model")  # ZeRO-3 shards were gathered for the save
    assert model.get_input_embeddings().weight.shape[0] >= processor.image_vocab.id_range[1]
    assert (out / "checkpoint-2" / "state" / "pytorch_model").is_dir()  # DeepSpeed engine + optimizer shards


@pytest.mark.slow
def test_deepspeed_zero3_lora_resumes_exactly(tmp_path, visual_tokenizer, reference):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--num_processes", "1", "-m", "mllm.training.loop", "recipes/demo_llm.yaml"]
    lora = ["lora.enabled=true", "lora.r=4", "train.save_every=2"]
    launch("deepspeed_zero3", args + llm_overrides(full, visual_tokenizer, *lora), deepspeed_env())
    assert_same_weights(full / "final", reference / "lora" / "final")

    cut.mkdir()  # an interrupted run: only its step-2 checkpoint survived
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    launch("deepspeed_zero3", args + llm_overrides(cut, visual_tokenizer, *lora), deepspeed_env())
    assert [json.loads(line)["step"] for line in open(cut / "log.jsonl")] == [3, 4]
    assert log_losses(cut) == pytest.approx(log_losses(full)[2:], rel=1e-5)
    assert_same_weights(cut / "final", full / "final", atol=1e-6)
    assert (cut / "final" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_run_with_a_live_zero3_accelerator_builds_models_whole(tmp_path, visual_tokenizer, reference):
    # An Accelerator made before the stage (here: by the caller) makes from_pretrained partition weights (zero.Init);
    # mllm.training.loop.run must still build, bridge and encode with whole models, then let prepare() partition them.
    out = tmp_path / "zero3"
    script = (
        "import sys; from accelerate import Accelerator; from accelerate.utils import DeepSpeedPlugin;"
        "from mllm.training.recipe import load_recipe; from mllm.training.loop import run;"
        "acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config='recipes/deepspeed/zero3.json'));"
        "assert acc.distributed_type == 'DEEPSPEED';"
        "run(load_recipe('recipes/demo_llm.yaml', sys.argv[1:]), acc)"
    )
    env = {**os.environ, **deepspeed_env(), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_DEEPSPEED": "true", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = llm_overrides(out, visual_tokenizer, "train.save_every=0", "lora.enabled=true", "lora.r=4")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-6000:]
    assert_same_weights(out / "final", reference / "lora" / "final")


@pytest.mark.slow
def test_deepspeed_zero2_accumulation_matches_one_batch(tmp_path, visual_tokenizer, reference):
    # 4 micro-batches of 1 sample (each its own number of target tokens) = the reference's batch of 4, under ZeRO-2
    out = tmp_path / "zero2-accumulate"
    launch("deepspeed_zero2", ["--num_processes", "1", "-m", "mllm.training.loop", "recipes/demo_llm.yaml",
                               *llm_overrides(out, visual_tokenizer, "train.save_every=0",
                                              "train.gradient_accumulation_steps=4")], deepspeed_env())
    assert log_losses(out) == pytest.approx(log_losses(reference / "full"), rel=1e-5)
    assert_same_weights(out / "final", reference / "full" / "final", atol=1e-4)  # Adam magnifies summation-order noise


def ddp_overrides(out, visual_tokenizer, accumulation: int = 1) -> list[str]:
    return llm_overrides(out, visual_tokenizer, "train.save_every=0", "lora.enabled=true", "lora.r=4",
                         f"train.gradient_accumulation_steps={accumulation}")


@pytest.mark.slow
def test_ddp_two_processes_shard_data_and_agree(tmp_path, visual_tokenizer, reference):
    out = tmp_path / "ddp"
    overrides = ddp_overrides(out, visual_tokenizer)
    launch("ddp_cpu", ["tests/mllm/training/test_distributed.py", "--worker", str(out), "recipes/demo_llm.yaml", *overrides],
           {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    from mllm.training.stage import step_indices

    for step, (a, b) in enumerate(zip(ranks[0]["indices"], ranks[1]["indices"])):
        assert a and b and not set(a) & set(b)  # disjoint shards ...
        assert sorted(a + b) == sorted(step_indices(step, 4, 32, seed=0).tolist())  # ... of the global batch
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()
    # the logged loss is the step's token mean over both ranks. Each rank draws the tasks of its own samples from its
    # own generator, so the examples differ from the one-process run's: only the first step's loss is close to it
    losses = log_losses(out)
    assert losses[0] == pytest.approx(log_losses(reference / "lora")[0], rel=0.01) and losses[-1] < losses[0]
    text_rows = json.loads((out / "final" / "image_vocab.json").read_text())["text_vocab_size"]
    for name in ("lm_head.weight", "model.embed_tokens.weight"):  # LoRA never touches the text rows
        torch.testing.assert_close(weights(out / "final")[name][:text_rows],
                                   weights(reference / "lora" / "final")[name][:text_rows], rtol=0, atol=0)

    # two micro-batches per rank (of unequal token counts) give the same run: each micro-batch's loss is divided by
    # the token count of the whole step, both ranks and both micro-batches
    accumulated = tmp_path / "ddp-accumulate"
    launch("ddp_cpu", ["tests/mllm/training/test_distributed.py", "--worker", str(accumulated), "recipes/demo_llm.yaml",
                       *ddp_overrides(accumulated, visual_tokenizer, accumulation=2)],
           {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert log_losses(accumulated) == pytest.approx(losses, rel=1e-5)
    assert_same_weights(accumulated / "final", out / "final", atol=1e-4)


def worker(out: str, recipe_path: str, overrides: list[str]) -> None:
    """Train under the launcher, recording the sample indices of each step on this rank and a hash of the weights."""
    from accelerate.utils import set_seed

    from mllm.training.loop import Trainer, build_stage
    from mllm.training.recipe import load_recipe
    from mllm.training.stages import llm as llm_data

    seen = []
    shard = llm_data.shard_indices

    def recording(indices, rank, world):
        mine = shard(indices, rank, world)
        seen.append(mine.tolist())
        return mine

    llm_data.shard_indices = recording
    recipe = load_recipe(recipe_path, overrides)
    set_seed(recipe.train.seed)  # as mllm.training.loop.run does
    trainer = Trainer(recipe, build_stage(recipe))
    trainer.train()
    acc = trainer.accelerator
    digest = hashlib.sha256()
    for name, value in sorted(acc.unwrap_model(trainer.model).state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    report = {"world": acc.num_processes, "indices": seen, "hash": digest.hexdigest()}
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3], sys.argv[4:])
