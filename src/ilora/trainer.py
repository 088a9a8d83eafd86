"""`ILoRATrainer`: a drop-in `transformers.Trainer` that trains with I-LoRA.

The Trainer keeps what it is good at (data loading, optimizer, scheduler, mixed precision,
gradient accumulation, logging to TensorBoard / W&B, checkpoints, Accelerate). ilora adds:
the two adapters (set up here), the step's loss (`ILoRA.loss`), the EMA after each optimizer step
(a callback on `on_optimizer_step`), and the task output directory (`save_task`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from . import distributed, precision, taskdir
from .adapters import PLASTIC, STABLE, add_stable_copy, attach_adapters, load_adapters
from .buffer import ReplayBuffer
from .config import ILoRAArguments, check_training_arguments
from .data import PadCollator, prepare_dataset
from .errors import ILoRAError
from .method import ILoRA

logger = logging.getLogger(__name__)


class _EMAAfterOptimizerStep(TrainerCallback):
    def __init__(self, method: ILoRA):
        self.method = method

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_optimizer_step()


class ILoRATrainer(Trainer):
    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        ilora_args: ILoRAArguments | None = None,
        peft_config: LoraConfig | None = None,
        train_dataset=None,
        processing_class=None,
        data_collator=None,
        cutoff_len: int = 1024,
        use_chat_template: bool = True,
        **kwargs: Any,
    ):
        self.ilora_args = ilora_args = ilora_args or ILoRAArguments()
        check_training_arguments(args)
        precision.warn_if_emulated(args.bf16, precision.detect(args.device.type))
        set_seed(args.seed)  # LoRA initialisation below draws random numbers
        self.base_identity = taskdir.base_model_identity(model)
        self.previous_manifest: dict | None = None
        # each rank keeps its own reservoir over its own data shard, with its own random stream
        buffer_seed = args.seed + args.process_index
        model, self.lora_identity, ema_step, buffer = self._setup_model(model, peft_config, buffer_seed, args)
        pad_token_id = _pad_token_id(processing_class, model)
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, processing_class, cutoff_len, use_chat_template)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=data_collator or PadCollator(pad_token_id),
            **kwargs,
        )
        self._refuse_unsupported_parallelism()
        # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.ilora = ILoRA(
            self.model,
            ilora_args,
            pad_token_id=pad_token_id,
            replay_batch_size=ilora_args.replay_batch_size or args.per_device_train_batch_size,
            buffer=buffer,
            step=ema_step,
            task_id=ilora_args.current_task_id or "",
        )
        self.add_callback(_EMAAfterOptimizerStep(self.ilora))

    # ------------------------------------------------------------------ set-up
    def _refuse_unsupported_parallelism(self) -> None:
        """The EMA needs whole adapter tensors on every process: refuse sharded engines at start-up rather
        than train something that is not I-LoRA."""
        if self.is_fsdp_enabled:
            raise ILoRAError("FSDP shards the adapter tensors; ilora's EMA needs them whole (use DDP)")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
            raise ILoRAError("DeepSpeed ZeRO-3 shards the adapter tensors; ilora's EMA needs them whole")

    def _setup_model(self, model, peft_config, seed, training_args):
        """Plastic (+ stable) adapters: fresh, from the previous task, or as given on a PeftModel."""
        args = self.ilora_args
        if args.previous_task_model:
            return self._continue_previous_task(model, peft_config, training_args)
        buffer = ReplayBuffer(args.ilora_buffer_size, seed=seed) if args.uses_replay else None
        if isinstance(model, PeftModel):
            if PLASTIC not in model.peft_config:
                raise ILoRAError(f"the PeftModel has adapters {list(model.peft_config)}; ilora needs one named 'plastic'")
            if args.uses_stable and STABLE not in model.peft_config:
                add_stable_copy(model)
            return model, taskdir.lora_identity(model.peft_config[PLASTIC]), 0, buffer
        if peft_config is None:
            raise ILoRAError("pass peft_config=LoraConfig(...) (or a PeftModel with a 'plastic' adapter)")
        identity = taskdir.lora_identity(peft_config)
        return attach_adapters(model, copy.deepcopy(peft_config), with_stable=args.uses_stable), identity, 0, buffer

    def _continue_previous_task(self, model, peft_config, training_args):
        args = self.ilora_args
        if isinstance(model, PeftModel):
            raise ILoRAError("with previous_task_model, pass the base model: adapters are loaded from the previous task")
        directory = Path(args.previous_task_model)
        manifest = taskdir.read_manifest(directory)
        lora = taskdir.lora_identity(peft_config) if peft_config is not None else manifest["lora"]
        taskdir.check_compatible(manifest, directory, lora, self.base_identity, args.prev_task_id)
        plastic_dir, stable_dir = taskdir.previous_paths(directory, manifest, args.ema_adapter_path)
        if args.uses_stable and stable_dir is None:
            raise ILoRAError(f"{directory}: the previous task saved no stable adapter (save_ema_adapter was off)")
        peft_model = load_adapters(model, plastic_dir, stable_dir if args.uses_stable else None)
        buffer = None
        if args.uses_replay:
            if manifest.get("buffer") is None:
                raise ILoRAError(f"{directory}: the previous task saved no replay buffer")
            ranks = manifest["buffer"].get("ranks", 1)
            if ranks != training_args.world_size:
                raise ILoRAError(
                    f"{directory} kept {ranks} per-rank replay buffers; this run has {training_args.world_size} processes"
                )
            rank_dir = taskdir.buffer_path(directory / "buffer", ranks, training_args.process_index)
            buffer = ReplayBuffer.load(rank_dir, capacity=args.ilora_buffer_size)
        self.previous_manifest = manifest
        return peft_model, lora, int(manifest.get("ema_step", 0)), buffer

    # ------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`resume_from_checkpoint=True` means the newest *complete* checkpoint in output_dir."""
        if resume_from_checkpoint is True or resume_from_checkpoint in taskdir.RESUME_LATEST:
            resume_from_checkpoint = taskdir.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ILoRAError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            resume_from_checkpoint = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint (both adapters, optimizer, scheduler, RNG) plus the buffer and the EMA
        step; a marker written last says the checkpoint is complete. A diverged state is never
        checkpointed: resuming from it would only diverge again."""
        self.ilora.check_finite(f"by optimizer step {self.state.global_step}", adapters=True)
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.ilora.buffer is not None:  # every rank saves its own buffer
            self.ilora.buffer.save(taskdir.buffer_path(folder / "ilora_buffer"))
        distributed.barrier()
        if self.args.should_save:
            taskdir.write_json_atomically(
                folder / taskdir.CHECKPOINT_MARKER,
                {"ema_step": self.ilora.step, "task_id": self.ilora_args.current_task_id, "format_version": 1},
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        folder = Path(resume_from_checkpoint)
        if not taskdir.is_complete_checkpoint(folder):
            raise ILoRAError(f"{folder}: not a complete ilora checkpoint (no {taskdir.CHECKPOINT_MARKER})")
        state = taskdir.read_json(folder / taskdir.CHECKPOINT_MARKER, "checkpoint marker")
        if not isinstance(state, dict) or not isinstance(state.get("ema_step"), int):
            raise ILoRAError(f"{folder / taskdir.CHECKPOINT_MARKER}: damaged checkpoint marker (no integer ema_step)")
        for name in (PLASTIC, STABLE):
            if (folder / name).is_dir():
                taskdir.check_adapter_dir(folder / name)
        taskdir.read_json(folder / "trainer_state.json", "trainer state")
        logger.info("resuming from %s", folder)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        buffer = None
        if self.ilora.buffer is not None:  # (an empty buffer is falsy: test for None)
            buffer = ReplayBuffer.load(taskdir.buffer_path(folder / "ilora_buffer"))
        self.ilora.restore(state["ema_step"], buffer)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(t) in in_optimizer for t in self.ilora.adapters.stable):
            raise RuntimeError("a stable adapter tensor reached the optimizer")
        missing = [t for t in self.ilora.adapters.plastic if id(t) not in in_optimizer]
        if missing:
            raise RuntimeError(f"{len(missing)} plastic adapter tensors are not in the optimizer")
        return optimizer

    # -------------------------------------------------------------- the step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: plain loss, no buffer, no replay
            inputs = {k: v for k, v in inputs.items() if k != "lengths"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.ilora.loss(inputs, forward=model)  # `model` may be the DDP wrapper
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the method's means since the last one
            logs.update(self.ilora.pop_logs())
        super().log(logs, start_time)

    # ---------------------------------------------------------------- output
    def save_task(self, output_dir: str | Path | None = None) -> Path:
        """Write plastic, stable, buffer and manifest so the next task can start from them (every rank
        calls this: each saves its buffer, rank 0 the rest)."""
        output_dir = Path(output_dir or self.args.output_dir)
        args = self.ilora_args
        self.ilora.check_finite("by the end of the task", adapters=True, outputs=True)  # nothing diverged is written
        last_log = next((e for e in reversed(self.state.log_history) if "loss" in e), {})
        summary = next((e for e in reversed(self.state.log_history) if "train_loss" in e), {})
        # means over the steps since the last log, or that log if nothing came after it
        final_losses = {k: v for k, v in last_log.items() if k in ("loss", "ce_loss", "consistency_loss", "ema_skipped")}
        final_losses.update(self.ilora.pop_logs())
        if "train_loss" in summary:
            final_losses["train_loss"] = summary["train_loss"]
        manifest = {
            "task_id": args.current_task_id,
            "prev_task_id": self.previous_manifest.get("task_id") if self.previous_manifest else None,
            "base_model": self.base_identity,
            "lora": self.lora_identity,
            "ema_step": self.ilora.step,
            "global_steps": self.state.global_step,
            "train_seconds": summary.get("train_runtime"),  # of the session that finished the task
            "hardware": precision.run_record(self.args),  # what trained it, in which precision
            "final_losses": final_losses,
        }
        return taskdir.write_task(output_dir, self.model, self.ilora.buffer, args, manifest)


def _pad_token_id(tokenizer, model) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0
