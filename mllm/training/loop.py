"""One training loop for every stage, driven by a :class:`~mllm.training.recipe.Recipe` and run under ``accelerate launch``.

    accelerate launch -m mllm.train recipes/tokenizer_conv_vq.yaml [train.steps=200 ...]

Parallelism (DDP, DeepSpeed, FSDP) comes from the accelerate config file, never from this code. The loop draws the
batch of step ``s`` deterministically from ``(seed, s)`` and shards it across processes, so an interrupted run
resumed from its last checkpoint continues exactly as an uninterrupted one would.

Checkpoints: ``output_dir/checkpoint-<step>/`` holds the model (``save_pretrained`` layout, or the whole bundle for the
llm stage) plus ``state/`` (optimizer, scheduler, RNG) from ``accelerator.save_state``; ``output_dir/final/`` holds
the final model. ``output_dir/log.jsonl`` gets one line per logged step.

The cosine schedule counts global steps: the loop steps it itself (it is registered for checkpointing, not prepared).
Under DeepSpeed the recipe still owns the hyperparameters: the loop's AdamW is handed to the engine (the DeepSpeed
JSON has no ``optimizer``/``scheduler`` section) and the JSON's ``"auto"`` batch size and gradient clipping are filled
from ``recipe.train``. Under ZeRO-3 the full weights are gathered on every rank while a model is saved, so saved
models are always whole.

Under FSDP (version 2, ``recipes/accelerate/fsdp.yaml``) the model is sharded by ``accelerator.prepare``; a copy of it
with every parameter on the meta device (no memory) is kept from before. Saving gathers the full state dict
(``accelerator.get_state_dict``: every rank takes part, only the main process receives the tensors, on CPU), loads
it into a copy of that skeleton and hands the whole model to ``Stage.save_fn`` on the main process, so
``checkpoint-N/model`` and ``final`` are the same vanilla layouts as without FSDP. Optimizer, scheduler and RNG state
go through ``accelerator.save_state`` (the config's ``fsdp_state_dict_type`` chooses sharded or full files), and
``load_state`` restores them on resume. accelerate turns FSDP on only for GPUs: an FSDP config launched on CPUs is
refused with an error rather than run unsharded. The tokenizer stage is refused under FSDP too: its quantizers write
the codebook inside forward, and FSDP drops writes to gathered parameters (visual tokenizers train data-parallel).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
import time
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .recipe import Recipe, load_recipe, save_recipe
from .stage import Stage, step_batches

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str) -> Optional[tuple[int, str]]:
    """(step, path) of the newest complete checkpoint in ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.exists(os.path.join(path, "COMPLETE")):
            found.append((int(m.group(1)), path))
    return max(found) if found else None


class Trainer:
    """Runs a :class:`Stage` for ``recipe.train.steps`` steps with checkpoints, resume, progress bar and logs."""

    def __init__(self, recipe: Recipe, stage: Stage, accelerator: Optional[Accelerator] = None):
        self.recipe, self.stage = recipe, stage
        self.accelerator = accelerator or Accelerator()
        check_fsdp(self.accelerator)
        if self.is_fsdp and recipe.stage == "tokenizer":
            # measured: under FSDP2 the codebook of an EMA VQ stays at its initial values while DDP moves it
            raise ValueError(
                "FSDP cannot train the tokenizer stage: its quantizers write the codebook inside forward (EMA updates, "
                "k-means init, dead-code restarts), and FSDP drops writes to gathered parameters. Visual tokenizers "
                "are small enough to replicate: use data parallelism (a MULTI_GPU accelerate config, or "
                "recipes/accelerate/ddp_cpu.yaml on CPUs)."
            )
        # FSDP shards the model in place: keep a parameter-free copy to load the gathered weights into when saving
        self._skeleton = meta_copy(stage.model) if self.is_fsdp else None
        cfg = recipe.train
        params = [p for p in stage.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        fill_deepspeed_auto(self.accelerator, recipe)
        self.model, self.optimizer = self.accelerator.prepare(stage.model, optimizer)
        # The schedule counts global steps, so the loop steps it once per step; a prepared scheduler would be stepped
        # once per process (accelerate assumes per-process batches). Registered, it is still saved with the state.
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        self.step = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def resume(self) -> None:
        found = latest_checkpoint(self.recipe.output_dir)
        if found is None:
            return
        self.step, path = found
        self.accelerator.load_state(os.path.join(path, "state"))
        if self.is_main:
            print(f"resumed from {path} (step {self.step})", file=sys.stderr)

    def train(self) -> list[dict]:
        cfg, acc = self.recipe.train, self.accelerator
        os.makedirs(self.recipe.output_dir, exist_ok=True)
        self.resume()
        history: list[dict] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc=f"train {self.recipe.stage}",
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
        self.model.train()
        batches = step_batches(self.stage.batch_for_step, self.step, cfg.steps, acc.process_index,
                               acc.num_processes, cfg.num_workers)
        for batch in batches:
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, metrics = self.stage.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {self.step}: lower train.lr or check the data")
            acc.backward(loss)
            if cfg.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            loss = acc.reduce(loss.detach(), "mean")  # mean over ranks: logs match a single-process run
            record = {"step": self.step, "loss": loss.item(), "lr": self.scheduler.get_last_lr()[0], **metrics}
            history.append(record)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(record, bar)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_final()
        return history

    def _log(self, record: dict, bar) -> None:
        if not self.is_main:
            return
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "psnr", "perplexity")})
        with open(os.path.join(self.recipe.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in record.items() if isinstance(v, (int, float))}) + "\n")

    def save_checkpoint(self) -> str:
        path = os.path.join(self.recipe.output_dir, f"checkpoint-{self.step}")
        self.accelerator.save_state(os.path.join(path, "state"))
        with self.whole_model() as model:
            if self.is_main:
                self.stage.save_fn(model, os.path.join(path, "model"))
                save_recipe(self.recipe, os.path.join(path, "recipe.yaml"))
                open(os.path.join(path, "COMPLETE"), "w").close()  # only complete checkpoints are resumed from
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self) -> str:
        path = os.path.join(self.recipe.output_dir, "final")
        self.accelerator.wait_for_everyone()
        with self.whole_model() as model:
            if self.is_main:
                self.stage.save_fn(model, path)
                save_recipe(self.recipe, os.path.join(path, "recipe.yaml"))
        self.accelerator.wait_for_everyone()
        return path

    @contextlib.contextmanager
    def whole_model(self):
        """The unwrapped model with every parameter whole; all ranks must enter (ZeRO-3 and FSDP gather collectively).

        Under FSDP it is a separate copy built on the main process from the gathered full state dict (CPU tensors);
        the other processes get ``None`` and must not save.
        """
        if self.is_fsdp:
            state_dict = self.accelerator.get_state_dict(self.model)  # collective; tensors on the main process only
            yield model_from_state_dict(self._skeleton, state_dict) if self.is_main else None
            return
        model = self.accelerator.unwrap_model(self.model)
        if not is_zero3(self.accelerator):
            yield model
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model


def check_fsdp(accelerator: Accelerator) -> None:
    """Refuse an FSDP launch that accelerate did not turn into FSDP, and FSDP version 1.

    ``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP=true``, but accelerate enables FSDP only when
    it finds GPUs (or another accelerator): on CPUs every process would otherwise train a whole model of its own (or
    plain DDP with ``ACCELERATE_USE_CPU``), which is not what the config asked for.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if accelerator.distributed_type != DistributedType.FSDP:
        if requested:
            raise RuntimeError(
                f"the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up "
                f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es) on "
                f"{accelerator.device.type}: accelerate enables FSDP only on GPUs. On CPUs use "
                "recipes/accelerate/ddp_cpu.yaml (data parallel) instead."
            )
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"mllm.training.loop supports FSDP version 2 (fully_shard) only, got fsdp_version={version}: set "
                         "`fsdp_version: 2` in the accelerate config (see recipes/accelerate/fsdp.yaml)")


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory; tied parameters stay tied, buffers are
    copied): the skeleton that :func:`model_from_state_dict` fills once the model itself is sharded."""
    memo = {}
    for param in model.parameters():  # deepcopy returns the memo's entry for each parameter object
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def model_from_state_dict(skeleton: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A whole model: a copy of ``skeleton`` (see :func:`meta_copy`) holding the tensors of the full ``state_dict``.

    Tensors are cast to the skeleton's dtypes (FSDP may have upcast trainable parameters to float32 for mixed
    precision; the saved model keeps the dtypes the stage built it with) and assigned without a copy. Parameters that
    were tied in the skeleton are tied again, so a state dict holding only one name of a tied group is enough.

    Raises:
        ValueError: ``state_dict`` has keys the model does not have, a shape that differs, or lacks a parameter or
            persistent buffer.
    """
    model = copy.deepcopy(skeleton)
    expected = model.state_dict()  # meta tensors (and buffers), every name of a tied group included
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise ValueError(f"the gathered state dict has {len(unknown)} key(s) the model does not have: {unknown[:5]}")
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = {name: names for names in groups.values() if len(names) > 1 for name in names}
    missing = []
    for name in expected:
        if name not in state_dict and not any(n in state_dict for n in tied.get(name, ())):
            missing.append(name)
    if missing:
        raise ValueError(f"the gathered state dict lacks {len(missing)} tensor(s) of the model: {missing[:5]}")
    tensors = {}
    for name, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the gathered state dict but "
                             f"{tuple(expected[name].shape)} in the model")
        tensors[name] = value.to(expected[name].dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for names in groups.values():  # assign=True gave each name of a tied group its own tensor (or left it on meta)
        if len(names) > 1:
            source = model.get_parameter(next(n for n in names if n in tensors))
            for name in names:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, source)
    return model


def is_zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def fill_deepspeed_auto(accelerator: Accelerator, recipe: Recipe) -> None:
    """Fill the DeepSpeed config's ``"auto"`` batch size and gradient clipping from the recipe (no-op without it).

    Without a dataloader accelerate cannot infer ``train_micro_batch_size_per_gpu``; the loop shards each global
    batch itself, so the per-rank size is ``ceil(batch_size / world)``. DeepSpeed clips gradients inside its step
    (``clip_grad_norm_`` only reports the norm there), so the recipe's ``grad_clip`` must reach its config.
    """
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None:
        return
    cfg = recipe.train
    micro = -(-cfg.batch_size // accelerator.num_processes)
    plugin.fill_match("train_micro_batch_size_per_gpu", must_match=False, train_micro_batch_size_per_gpu=micro)
    plugin.fill_match("gradient_clipping", must_match=False, gradient_clipping=float(cfg.grad_clip or 0.0))


def build_stage(recipe: Recipe) -> Stage:
    """The one place a recipe's stage name becomes stage-building code."""
    from .stages import STAGE_BUILDERS

    return STAGE_BUILDERS[recipe.stage](recipe)


@contextlib.contextmanager
def built_whole(accelerator: Optional[Accelerator]):
    """Build the stage's models whole even when ``accelerator`` already runs ZeRO-3 (``prepare`` partitions them).

    A live ZeRO-3 Accelerator makes ``from_pretrained`` partition weights while loading (``zero.Init``), which the
    bridge (in-place init of new rows), PEFT and the visual tokenizer (encodes the training images) cannot work with.
    """
    if accelerator is None or not is_zero3(accelerator):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def run(recipe: Recipe, accelerator: Optional[Accelerator] = None) -> tuple[str, list[dict]]:
    """Build the stage and train it; returns (final model path, per-step history of this run)."""
    set_seed(recipe.train.seed)
    with built_whole(accelerator):
        stage = build_stage(recipe)
    trainer = Trainer(recipe, stage, accelerator)
    history = trainer.train()
    return os.path.join(recipe.output_dir, "final"), history


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: accelerate launch -m mllm.train RECIPE.yaml [section.key=value ...]")
        raise SystemExit(0 if argv else 2)
    recipe = load_recipe(argv[0], argv[1:])
    start = time.time()
    path, _ = run(recipe)
    print(f"saved {path} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
