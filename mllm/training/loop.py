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

A stage with an :class:`~mllm.training.stage.Adversary` (the tokenizer stage with ``adversarial.enabled``) trains two
models with two AdamW optimizers, both prepared (DDP wraps both): each micro-batch updates the model with the
adversary frozen, then (from ``adversary.start`` on) the adversary on the model's detached outputs. Both models'
weights and both optimizers are in every ``state/``; ``adversary.json`` beside it records the adversary's
architecture, and a resume rebuilds it from there. EMA, saved models and ``final/`` are the stage's model only.
Under DeepSpeed ZeRO-1/2 (one engine per Accelerator) the adversary stays outside the engine, replicated with
averaged gradients, and its weights and optimizer go to ``checkpoint-N/adversary/`` (:mod:`.replicated`); ZeRO-3 is
refused with an adversary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .ema import WeightEMA
from .freeze import freeze_modules
from .memory import enable_gradient_checkpointing
from .optim import adamw, mixed_precision_context
from .parallel import (
    built_whole,
    check_fsdp,
    fill_deepspeed_auto,
    is_zero3,
    master_weights_follow,
    meta_copy,
    model_from_state_dict,
)
from .replicated import ReplicatedModel
from .recipe import Recipe, load_recipe, recipe_to_dict, save_recipe
from .stage import Adversary, Stage, step_batches
from .tracking import check_tracking, tracker_config, tracker_options

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOG_NAME = "log.jsonl"
EMA_STATE = "ema.safetensors"
ADVERSARY_CONFIG = "adversary.json"
REPLICATED_ADVERSARY = "adversary"  # under DeepSpeed: the adversary's weights and optimizer (outside state/)


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


def finished_run(recipe: Recipe) -> Optional[str]:
    """``output_dir/final`` when this very recipe already ran to the end there (its ``recipe.yaml`` is written last)."""
    path = os.path.join(recipe.output_dir, "final")
    saved = os.path.join(path, "recipe.yaml")
    if not os.path.isfile(saved):
        return None
    return path if recipe_to_dict(load_recipe(saved)) == recipe_to_dict(recipe) else None


def trim_log(path: str, step: int) -> None:
    """Drop the lines of ``log.jsonl`` past ``step`` (written by a run that stopped before its next checkpoint), so a
    resumed run never logs a step twice."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def set_aside_pickles(state_dir: str, is_main: bool) -> None:
    """Rename the ``custom_checkpoint_*.pkl`` files earlier versions saved the scheduler in: accelerate would unpickle
    them with ``weights_only=False`` (running whatever a crafted file holds), and the loop no longer needs them (the
    schedule is replayed from the step)."""
    for name in sorted(os.listdir(state_dir)) if is_main else []:
        if re.match(r"^custom_checkpoint_\d+\.pkl$", name):
            os.replace(os.path.join(state_dir, name), os.path.join(state_dir, name + ".ignored"))
            print(f"set aside {name} in {state_dir}: the loop loads no pickle (the schedule is rebuilt from the "
                  "step)", file=sys.stderr)


def split_batch(batch: dict, parts: int) -> list[dict]:
    """``batch`` cut into ``parts`` micro-batches along its first axis (per-batch scalars go with the first)."""
    if parts == 1:
        return [batch]
    rows = next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim), 0)
    if rows < parts:
        raise ValueError(f"this process's batch has {rows} rows, fewer than train.gradient_accumulation_steps={parts}: "
                         "raise train.batch_size or lower the accumulation (with data.packing, rows are packed "
                         "sequences of up to data.max_tokens)")
    micro = [{} for _ in range(parts)]
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim and len(value) == rows:
            for part, chunk in zip(micro, torch.tensor_split(value, parts)):
                part[key] = chunk
        else:
            micro[0][key] = value
            for part in micro[1:]:
                if not (torch.is_tensor(value) and value.ndim == 0):
                    part[key] = value
    return micro


def mean_metrics(metrics: list[dict]) -> dict:
    """Per-step metrics: the mean over micro-batches (counts such as ``skipped_images`` are summed)."""
    if len(metrics) == 1:
        return metrics[0]
    out = {}
    for key in metrics[0]:
        values = [m[key] for m in metrics if key in m]
        out[key] = sum(values) if key.startswith(("skipped", "num_")) else sum(values) / len(values)
    return out


class Trainer:
    """Runs a :class:`Stage` for ``recipe.train.steps`` steps with checkpoints, resume, progress bar and logs."""

    def __init__(self, recipe: Recipe, stage: Stage, accelerator: Optional[Accelerator] = None):
        self.recipe, self.stage = recipe, stage
        self.accelerator = accelerator or Accelerator(**tracker_options(recipe))
        self.tracking = check_tracking(self.accelerator, recipe.train.report_to)
        check_fsdp(self.accelerator)
        if (self.is_fsdp or is_zero3(self.accelerator)) and recipe.stage == "tokenizer":
            # measured: under FSDP2 the codebook of an EMA VQ stays at its initial values while DDP moves it
            raise ValueError(
                f"{'FSDP' if self.is_fsdp else 'ZeRO-3'} cannot train the tokenizer stage: its quantizers write the "
                "codebook inside forward (EMA updates, k-means init, dead-code restarts), and sharding drops writes "
                "to gathered parameters. Visual tokenizers are small enough to replicate: use data parallelism (a "
                "MULTI_GPU accelerate config, or recipes/accelerate/ddp_cpu.yaml on CPUs) or DeepSpeed ZeRO-1/2."
            )
        # FSDP shards the model in place: keep a parameter-free copy to load the gathered weights into when saving
        self._skeleton = meta_copy(stage.model) if self.is_fsdp else None
        cfg = recipe.train
        self.accumulation = int(cfg.gradient_accumulation_steps)
        if self.accumulation < 1:
            raise ValueError(f"train.gradient_accumulation_steps must be >= 1, got {self.accumulation}")
        self.accelerator.gradient_accumulation_steps = self.accumulation
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(stage.model)
        self.frozen = freeze_modules(stage.model, cfg.freeze)
        self.autocast = mixed_precision_context(self.accelerator, cfg.mixed_precision)
        params = [p for p in stage.model.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cfg.fused_optimizer,
                          sharded=self.is_fsdp)
        # The schedule counts global steps, so the loop steps it once per step (a prepared scheduler would be stepped
        # once per process). It is a pure function of the step: resuming rebuilds it, so no scheduler state (and no
        # pickle) is ever saved or loaded.
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        self.schedulers = [self.scheduler]
        fill_deepspeed_auto(self.accelerator, recipe, stage.model)
        self.adversary = self.adversary_optimizer = self.replicated = None
        if stage.adversary is None:
            self.model, self.optimizer = self.accelerator.prepare(stage.model, optimizer)
        elif self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # one engine per Accelerator
            self.adversary, self.adversary_optimizer = self._build_adversary(stage.adversary)
            self.replicated = ReplicatedModel(self.adversary, self.adversary_optimizer, self.accelerator.device)
            self.model, self.optimizer = self.accelerator.prepare(stage.model, optimizer)
        else:
            adversary, adversary_optimizer = self._build_adversary(stage.adversary)
            self.model, self.adversary, self.optimizer, self.adversary_optimizer = self.accelerator.prepare(
                stage.model, adversary, optimizer, adversary_optimizer)
        written = stage.forward_writes
        self.forward_written = written(self.accelerator.unwrap_model(self.model)) if written is not None else []
        self.ema = None
        if cfg.ema_decay:
            if self.is_fsdp or is_zero3(self.accelerator):
                raise ValueError("train.ema_decay needs whole parameters on every process: use DDP or ZeRO-1/2, not "
                                 "FSDP or ZeRO-3")
            self.ema = WeightEMA(self.accelerator.unwrap_model(self.model), cfg.ema_decay)
        self.step = 0

    def _build_adversary(self, spec: Adversary) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The adversary (rebuilt from the newest checkpoint's ``adversary.json`` when there is one, so a resume
        loads its weights into the same architecture) and its optimizer and schedule."""
        if is_zero3(self.accelerator):
            raise ValueError("adversarial training needs the decoder's last layer whole (the adaptive weight) and "
                             "replicates the discriminator: use ZeRO-1/2 (recipes/accelerate/deepspeed_zero2.yaml) "
                             "or DDP (a MULTI_GPU accelerate config, or recipes/accelerate/ddp_cpu.yaml on CPUs), "
                             "not ZeRO-3")
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and self.recipe.adversarial.adaptive_weight:
            raise ValueError("adversarial.adaptive_weight takes torch.autograd.grad through the tokenizer, which sets "
                             "off DeepSpeed's gradient reduction hooks mid-step: under DeepSpeed set "
                             "adversarial.adaptive_weight=false (the fixed adversarial.weight IBQ and Open-MAGVIT2 "
                             "train with, as recipes/tokenizer_ibq_256.yaml does), or train with DDP")
        model = spec.model
        found = latest_checkpoint(self.recipe.output_dir)
        saved = os.path.join(found[1], ADVERSARY_CONFIG) if found else None
        if saved and os.path.isfile(saved):
            with open(saved) as f:
                config = json.load(f)
            if config != spec.config:
                if self.is_main:
                    print(f"the adversary of {found[1]} was built as {config}, not as the recipe says "
                          f"({spec.config}): resuming with the checkpoint's", file=sys.stderr)
                model = spec.build(config)
            self.adversary_config = config
        else:
            self.adversary_config = spec.config
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                          fused=self.recipe.train.fused_optimizer)
        cfg = self.recipe.train
        self.schedulers.append(get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps))
        return model, optimizer

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def resume(self) -> None:
        found = latest_checkpoint(self.recipe.output_dir)
        if found is not None:
            self.step, path = found
            set_aside_pickles(os.path.join(path, "state"), self.is_main)
            self.accelerator.wait_for_everyone()
            self.accelerator.load_state(os.path.join(path, "state"))
            for _ in range(self.step):  # the schedule is a function of the step: replay it
                self.step_schedules()
            if self.ema is not None:
                self.ema.load_state_dict(load_file(os.path.join(path, EMA_STATE)))
            if self.replicated is not None:
                self.replicated.load(os.path.join(path, REPLICATED_ADVERSARY))
            if self.is_main:
                print(f"resumed from {path} (step {self.step})", file=sys.stderr)
        if self.is_main:
            trim_log(os.path.join(self.recipe.output_dir, LOG_NAME), self.step)

    def optimizer_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One optimizer step on ``batch`` (this process's share), in ``gradient_accumulation_steps`` micro-batches:
        gradients are summed over them (accelerate scales each loss by 1/N and syncs ranks on the last one)."""
        acc = self.accelerator
        losses, metrics = [], []
        models = [self.model] if self.adversary is None else [self.model, self.adversary]
        micros = split_batch(batch, self.accumulation)
        normalizer = self.step_weight(micros)
        # with a step-wide normalizer each micro-batch's loss is its share of the step's loss: undo the 1/N of
        # accelerate's accumulation and the 1/world of the data-parallel gradient average
        scale = self.accumulation * acc.num_processes if normalizer is not None else 1
        for micro in micros:
            with acc.accumulate(*models):
                with self.adversary_frozen() as adversary, master_weights_follow(acc, self.forward_written):
                    with self.autocast():  # the forward and loss only: backward runs outside autocast
                        if adversary is None:
                            extra = () if normalizer is None else (normalizer,)
                            loss, values = self.stage.loss_fn(self.model, micro, *extra)
                        else:
                            loss, values, inputs = self.stage.adversary.generator_loss(self.model, adversary, micro,
                                                                                       self.step)
                    self._update(loss * scale if scale != 1 else loss, self.model, self.optimizer, "loss")
                if self.adversary is not None:
                    values = {**values, **self.adversary_step(inputs)}
            losses.append(loss.detach())
            metrics.append(values)
        self.step_schedules()
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model))
        if normalizer is not None:  # shares of the step's loss: their sum over ranks is it (logged as a rank mean)
            return torch.stack(losses).sum() * acc.num_processes, mean_metrics(metrics)
        return torch.stack(losses).mean(), mean_metrics(metrics)

    def step_weight(self, micros: list[dict]) -> Optional[torch.Tensor]:
        """The weight sum of this step's loss over every micro-batch of every rank (``Stage.loss_weight``), or None."""
        if self.stage.loss_weight is None:
            return None
        total = sum(self.stage.loss_weight(micro).double() for micro in micros).to(self.accelerator.device)
        return self.accelerator.reduce(total, "sum") if self.accelerator.num_processes > 1 else total

    def step_schedules(self) -> None:
        with warnings.catch_warnings():  # the adversary's schedule also runs before adversary.start (no updates)
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for scheduler in self.schedulers:
                scheduler.step()

    def _update(self, loss: torch.Tensor, model, optimizer, name: str) -> None:
        cfg, acc = self.recipe.train, self.accelerator
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name} became {loss.item()} at step {self.step}: lower train.lr or check the "
                                     "data")
        if self.replicated is not None and model is self.adversary:
            self.replicated.update(loss, self.accumulation, acc.sync_gradients, cfg.grad_clip)
            return
        acc.backward(loss)
        if cfg.grad_clip and acc.sync_gradients:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()  # a no-op until the last micro-batch (accelerate's accumulation)
        optimizer.zero_grad(set_to_none=True)

    def adversary_step(self, inputs: dict) -> dict:
        """The adversary's update on the model's detached outputs (nothing before ``adversary.start``)."""
        if self.step < self.stage.adversary.start:
            return {"adversary_active": 0}
        loss, metrics = self.adversary(**inputs)
        self._update(loss, self.adversary, self.adversary_optimizer, "the adversary's loss")
        return {"adversary_active": 1, **metrics}

    @contextlib.contextmanager
    def adversary_frozen(self):
        """The unwrapped adversary with ``requires_grad`` off (the model's loss flows through it without giving it
        gradients), or None without one."""
        if self.adversary is None:
            yield None
            return
        adversary = self.accelerator.unwrap_model(self.adversary)
        params = [p for p in adversary.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield adversary
        finally:
            for p in params:
                p.requires_grad_(True)

    def train(self) -> list[dict]:
        cfg, acc = self.recipe.train, self.accelerator
        os.makedirs(self.recipe.output_dir, exist_ok=True)
        self.resume()
        if self.tracking:
            self.accelerator.init_trackers(os.path.basename(os.path.abspath(self.recipe.output_dir)),
                                           config=tracker_config(self.recipe))
        history: list[dict] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc=f"train {self.recipe.stage}",
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not every step
        self.train_mode(self.model)
        batches = step_batches(self.stage.batch_for_step, self.step, cfg.steps, acc.process_index,
                               acc.num_processes, cfg.num_workers)
        for batch in batches:
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, metrics = self.optimizer_step(batch)
            self.step += 1
            bar.update(1)
            loss = acc.reduce(loss.detach(), "mean")  # mean over ranks: logs match a single-process run
            record = {"step": self.step, "loss": loss.item(), "lr": self.scheduler.get_last_lr()[0], **metrics}
            evaluating = bool(cfg.eval_every and self.stage.evaluate_fn is not None
                              and (self.step % cfg.eval_every == 0 or self.step == cfg.steps))
            if evaluating:
                record.update(self.evaluate())
            history.append(record)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or evaluating:
                self._log(record, bar)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_final()
        if self.tracking:
            self.accelerator.end_training()
        return history

    def train_mode(self, model) -> None:
        """``model.train()`` with the modules of ``train.freeze`` kept in eval mode."""
        model.train()
        for module in self.frozen:
            module.eval()

    def _log(self, record: dict, bar) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tracking:
            self.accelerator.log({k: v for k, v in numbers.items() if k != "step"}, step=record["step"])
        if not self.is_main:
            return
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "psnr", "perplexity")})
        with open(os.path.join(self.recipe.output_dir, LOG_NAME), "a") as f:
            f.write(json.dumps(numbers) + "\n")

    def evaluate(self) -> dict:
        """The stage's held-out evaluation on the whole model (main process): ``eval_*`` metrics for this step's log
        line; the picture goes to ``output_dir/samples/step-N.png`` and to the tracker. Every rank must call it."""
        metrics = {}
        with self.whole_model() as model:
            if self.is_main and model is not None:
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    values, picture = self.stage.evaluate_fn(model)
                if was_training:
                    self.train_mode(model)
                metrics = {f"eval_{k}": v for k, v in values.items()}
                if picture is not None:
                    folder = os.path.join(self.recipe.output_dir, "samples")
                    os.makedirs(folder, exist_ok=True)
                    picture.save(os.path.join(folder, f"step-{self.step}.png"))
                    self._log_picture(picture)
        self.accelerator.wait_for_everyone()
        return metrics

    def _log_picture(self, picture) -> None:
        if not self.tracking:
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.asarray(picture)[None]}, step=self.step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"samples": [picture]}, step=self.step)

    def save_checkpoint(self) -> str:
        path = os.path.join(self.recipe.output_dir, f"checkpoint-{self.step}")
        self.accelerator.save_state(os.path.join(path, "state"))
        with self.whole_model() as model:
            if self.is_main:
                if self.adversary is not None:
                    with open(os.path.join(path, ADVERSARY_CONFIG), "w") as f:
                        json.dump(self.adversary_config, f, indent=2)
                    if self.replicated is not None:
                        self.replicated.save(os.path.join(path, REPLICATED_ADVERSARY))
                self.stage.save_fn(model, os.path.join(path, "model"))
                if self.ema is not None:
                    save_file(self.ema.state_dict(), os.path.join(path, EMA_STATE))
                    with self.ema.swapped_in(model):
                        self.stage.save_fn(model, os.path.join(path, "ema_model"))
                save_recipe(self.recipe, os.path.join(path, "recipe.yaml"))
                open(os.path.join(path, "COMPLETE"), "w").close()  # only complete checkpoints are resumed from
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self) -> str:
        path = os.path.join(self.recipe.output_dir, "final")
        self.accelerator.wait_for_everyone()
        with self.whole_model() as model:
            if self.is_main:
                if self.ema is None:
                    self.stage.save_fn(model, path)
                else:  # final/ holds the averaged weights (what evaluation uses), final-raw/ the trained ones
                    self.stage.save_fn(model, path + "-raw")
                    with self.ema.swapped_in(model):
                        self.stage.save_fn(model, path)
                save_recipe(self.recipe, os.path.join(path, "recipe.yaml"))  # written last: marks the run finished
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


def build_stage(recipe: Recipe) -> Stage:
    """The one place a recipe's stage name becomes stage-building code."""
    from .stages import STAGE_BUILDERS

    return STAGE_BUILDERS[recipe.stage](recipe)


def run(recipe: Recipe, accelerator: Optional[Accelerator] = None) -> tuple[str, list[dict]]:
    """Build the stage and train it; returns (final model path, per-step history of this run). A recipe that already
    ran to the end in its ``output_dir`` is not trained again (the history is empty)."""
    done = finished_run(recipe)
    if done is not None:
        print(f"{done} is already the result of this recipe: nothing to train (delete it to retrain; a recipe "
              "with more train.steps continues from the newest checkpoint)", file=sys.stderr)
        return done, []
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
