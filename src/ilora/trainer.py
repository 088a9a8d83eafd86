"""`ILoRATrainer`: a drop-in `transformers.Trainer` that trains any ilora method (I-LoRA by default);
`ContinualTrainerMixin` does the same for any Trainer subclass.

The Trainer keeps what it is good at (data loading, optimizer, scheduler, mixed precision, gradient
accumulation, logging to TensorBoard / W&B, checkpoints, Accelerate). ilora adds the adapters (the
trainable `plastic` here, whatever else the method needs through its `prepare_model`), the method's
loss per micro-batch, its hooks at the start of the task, after each optimizer step (a callback on
`on_optimizer_step`) and at the end of the task, what a checkpoint must carry besides the Trainer's
own state, and the task's output directory (`save_task`). Formats belong to `ilora.store`, the method
interface to `ilora.methods.base`, which parallel set-ups run to `ilora.runtime.policy`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from ilora import methods
from ilora.config.arguments import ContinualArguments
from ilora.config.checks import check_training_arguments
from ilora.core.adapters import (
    ADAPTER_CONFIG,
    PLASTIC,
    adapter_parameters,
    attach_adapters,
    check_adapter_fits,
    load_first_adapter,
)
from ilora.core.buffer import BufferSpec, ReplayBuffer, check_token_ids
from ilora.data.encode import PadCollator, prepare_dataset
from ilora.errors import ILoRAError, writing
from ilora.runtime import policy, precision, sharding
from ilora.runtime.loader import quantization_of
from ilora.store import checkpoint, taskdir
from ilora.store.identity import base_model_identity, lora_identity

logger = logging.getLogger(__name__)


class _MethodHooks(TrainerCallback):
    def __init__(self, method):
        self.method = method

    def on_train_begin(self, args, state, control, **kwargs):
        # after the Trainer's prepare: FSDP2 has replaced the parameters with sharded ones
        self.method.pair_adapters()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_optimizer_step()


class ContinualTrainerMixin:
    """What makes a `transformers.Trainer` (or a subclass: TRL's `SFTTrainer`, see `ilora.integrations.trl`)
    train an ilora method: the adapters, the method's loss and hooks, checkpoints that carry the method's
    state, and the task directory. Put it first: `class MyTrainer(ContinualTrainerMixin, SomeTrainer)`;
    `_training_data` says who tokenizes and collates the rows."""

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        continual_args: ContinualArguments | None = None,
        method_options: Any = None,
        peft_config: LoraConfig | None = None,
        train_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs: Any,
    ):
        self.continual_args = continual = continual_args or ContinualArguments()
        method_cls = methods.get(continual.method)
        self.method_options = _options(method_cls, method_options)
        check_training_arguments(args)
        precision.warn_if_emulated(args.bf16, precision.detect(args.device.type))
        set_seed(args.seed)  # LoRA initialisation below draws random numbers
        model = self._set_up_model(model, peft_config, processing_class, method_cls, args)
        buffer = self._buffer(method_cls, args)
        pad_token_id = _pad_token_id(processing_class, model)
        train_dataset, data_collator = self._training_data(train_dataset, processing_class, data_collator, pad_token_id)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        policy.check_engine(
            self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None,
            self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None,
            method_cls,
            bool(self.quantization),
            self.args.bf16,
        )
        # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.method = self._method(method_cls, pad_token_id, buffer)
        self.add_callback(_MethodHooks(self.method))

    def _method(self, method_cls, pad_token_id: int, buffer: ReplayBuffer | None):
        """The method on the Trainer's model, continuing the previous task's step count and state."""
        continual = self.continual_args
        method = method_cls(
            self.model,
            continual,
            self.method_options,
            pad_token_id=pad_token_id,
            replay_batch_size=continual.replay_batch_size or self.args.per_device_train_batch_size,
            buffer=buffer,
            step=self.previous.steps if self.previous else 0,
            task_id=continual.current_task_id or "",
        )
        if self.previous:
            method.load_state(*self.previous.method_state)
        return method

    def _training_data(self, dataset, tokenizer, collator, pad_token_id: int):
        """(dataset, collator) as the Trainer below takes them."""
        raise NotImplementedError

    def _set_up_model(self, model, peft_config, tokenizer, method_cls, args) -> PeftModel:
        """The base with the plastic adapter (fresh, or the previous task's) and what else the method adds;
        the base's and the tokenizer's identity recorded, a quantized base prepared for training."""
        self.base_identity = base_model_identity(model, tokenizer)
        self._vocab_size = model.get_input_embeddings().num_embeddings  # what a replay buffer's ids must stay below
        self.quantization = quantization_of(model)  # QLoRA: the base in 4 or 8 bits (None: full precision)
        if self.quantization and not isinstance(model, PeftModel):
            # norms and embeddings to fp32, the base frozen, inputs that carry gradients into the adapters
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        self.previous = self._previous_task(model, peft_config, method_cls, args)
        model, self.lora_identity = self._attach_plastic(model, peft_config)
        previous_adapters = self.previous.adapters if self.previous else {}
        method_cls.prepare_model(model, previous_adapters, self.continual_args, self.method_options)
        return model

    def create_accelerator_and_postprocess(self) -> None:
        """Accelerate turns FSDP on only for accelerator devices; on CPU processes (gloo) it would
        silently train with DDP instead. torch's FSDP2 runs on the CPU too: take Accelerate's FSDP path.
        Checkpoints are sharded unless fsdp_config says otherwise (which the policy refuses)."""
        plugin_args = self.args.fsdp_plugin_args
        if plugin_args is not None and "state_dict_type" not in (self.args.fsdp_config or {}):
            plugin_args["state_dict_type"] = "SHARDED_STATE_DICT"
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        # `accelerate launch` with an FSDP config file says so through the environment (FSDP_* settings)
        launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if (plugin_args is not None or launched) and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
            self.is_fsdp_enabled = True

    def _previous_task(self, model, peft_config, method_cls, args) -> taskdir.PreviousTask | None:
        continual = self.continual_args
        if not continual.previous_task_model:
            return None
        if isinstance(model, PeftModel):
            raise ILoRAError(
                "with previous_task_model, pass the base model: adapters are loaded from the previous task"
            )
        expected = taskdir.Expected(
            method=continual.method,
            lora=lora_identity(peft_config) if peft_config is not None else None,
            base=self.base_identity,
            quantization=self.quantization,
            prev_task_id=continual.prev_task_id,
        )
        buffer = buffer_spec(continual) if method_cls.uses_replay(continual) else None
        elsewhere = method_cls.previous_adapter_locations(self.method_options)
        directory = Path(continual.previous_task_model)
        return taskdir.load_previous(directory, expected, elsewhere, buffer, args.world_size, args.process_index)

    def _attach_plastic(self, model, peft_config) -> tuple[PeftModel, dict]:
        """The trainable adapter: the previous task's, fresh, or as given on a PeftModel."""
        if self.previous is not None:
            path = self.previous.adapters[PLASTIC]
            return load_first_adapter(model, path, trainable=True), self.previous.lora
        if isinstance(model, PeftModel):
            if PLASTIC not in model.peft_config:
                raise ILoRAError(
                    f"the PeftModel has adapters {list(model.peft_config)}; ilora needs one named 'plastic'"
                )
            return model, lora_identity(model.peft_config[PLASTIC])
        if peft_config is None:
            raise ILoRAError("pass peft_config=LoraConfig(...) (or a PeftModel with a 'plastic' adapter)")
        return attach_adapters(model, copy.deepcopy(peft_config), with_stable=False), lora_identity(peft_config)

    def _buffer(self, method_cls, args) -> ReplayBuffer | None:
        if not method_cls.uses_replay(self.continual_args):
            return None
        if self.previous is not None:
            self._check_buffer(self.previous.buffer, self.previous.directory)
            return self.previous.buffer
        # every rank keeps the same buffer over every rank's rows (the methods gather them), with the
        # same random stream: the draws of one process with the global batch
        return ReplayBuffer.create(buffer_spec(self.continual_args), seed=args.seed)

    # ------------------------------------------------------------- the task
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`resume_from_checkpoint=True` means the newest *complete* checkpoint in output_dir. Before the
        first step the method's start-of-task hook sees the task's rows (not again on a resume: its
        effects are in the checkpoint); after the last step its end-of-task hook does (EWC's Fisher)."""
        if resume_from_checkpoint is True or resume_from_checkpoint in checkpoint.RESUME_LATEST:
            resume_from_checkpoint = checkpoint.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ILoRAError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            resume_from_checkpoint = str(resume_from_checkpoint)
        if not resume_from_checkpoint:
            self.method.start_of_task(self.task_batches())
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self.method.end_of_task(self.task_batches())
        return output

    def task_batches(self) -> torch.utils.data.DataLoader:
        """The task's rows in file order, unshuffled: the start- and end-of-task hooks see the same rows
        on every rank and after a resume (the Trainer's own loader is shuffled and sharded)."""
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator
        )

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = {id(t) for t in self.method.trained_tensors()}
        if in_optimizer - trained:  # the stable adapter, a teacher, an earlier task's LoRA, the base
            raise RuntimeError(
                f"{len(in_optimizer - trained)} tensors besides the method's trainable ones reached the optimizer"
            )
        if trained - in_optimizer:
            raise RuntimeError(f"{len(trained - in_optimizer)} trainable plastic tensors are not in the optimizer")
        return optimizer

    # -------------------------------------------------------------- the step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: plain loss, no buffer, no replay
            inputs = {k: v for k, v in inputs.items() if k != "lengths"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.method.loss(inputs, forward=model)  # `model` may be the DDP wrapper
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the method's means since the last one
            logs.update(self.method.pop_logs())
        super().log(logs, start_time)

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint (adapters, optimizer, scheduler, RNG) plus what `store.checkpoint`
        adds. A diverged state is never checkpointed: resuming from it would only diverge again."""
        self.method.check_diverged(f"by optimizer step {self.state.global_step}", adapters=True)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        checkpoint.claim_checkpoint(folder)
        # a full disk: one line, exit 1; the folder has no completion marker, so a retry resumes from the one before
        with writing(folder):
            super()._save_checkpoint(model, trial)
            if self._adapters_outside_trainer_checkpoint():
                sharding.save_adapters(adapter_parameters(self.model), folder / checkpoint.SHARDED_ADAPTERS)
            state = checkpoint.CheckpointState(
                self.method.step, self.method.buffer, self.method.state(), self.method.task_loss()
            )
            checkpoint.save_checkpoint_state(folder, state, self.continual_args.current_task_id, self._identity())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 the Trainer gathers only the trainable adapter and writes it under every adapter's
        name (a checkpoint's `stable/` would hold the plastic weights): write each adapter whole instead."""
        if not sharding.is_partitioned(self.model):
            return super().save_model(output_dir, _internal_call)
        state = sharding.full_state(adapter_parameters(self.model))  # a collective: every rank
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _adapters_outside_trainer_checkpoint(self) -> bool:
        """Accelerate's FSDP checkpoint of a PEFT model keeps only the active adapter, DeepSpeed's leaves out
        every frozen parameter: under either, ilora checkpoints every adapter itself."""
        return sharding.is_sharded(self.model) or self.is_deepspeed_enabled

    def _load_rng_state(self, checkpoint):
        with _only_tensors(checkpoint):
            super()._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        folder = Path(resume_from_checkpoint)
        state = self._checked_checkpoint(folder)  # before the Trainer reads it
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore(folder, state)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A DeepSpeed resume never calls `_load_from_checkpoint` (the engine loads its own checkpoint
        first); this runs on every resume path, after the model's weights are loaded."""
        with _only_tensors(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            folder = Path(checkpoint)
            self._restore(folder, self._checked_checkpoint(folder))

    def _checked_checkpoint(self, folder: Path) -> checkpoint.CheckpointState:
        """What a checkpoint restores besides the Trainer's own state, checked to be complete and to fit."""
        # (an empty buffer is falsy: test for None)
        state = checkpoint.load_checkpoint_state(folder, self.method.buffer is not None, self._identity())
        if state.buffer is not None:
            self._check_buffer(state.buffer, folder)
        for adapter in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
            if (adapter / ADAPTER_CONFIG).is_file():  # what the Trainer will load into the model
                check_adapter_fits(self.model, adapter)
        logger.info("resuming from %s", folder)
        return state

    def _check_buffer(self, buffer: ReplayBuffer, where: Path) -> None:
        """A buffer read from disk holds only token ids this model has (whichever route read it)."""
        check_token_ids(buffer, self._vocab_size, str(where))

    def _identity(self) -> dict:
        """What a checkpoint records and a resume compares: base weights, tokenizer, LoRA settings."""
        return {"base_model": self.base_identity, "lora": self.lora_identity}

    def _restore(self, folder: Path, state: checkpoint.CheckpointState) -> None:
        self.method.pair_adapters()  # after DeepSpeed's cast to bf16: the stable adapter in fp32 before it loads
        if self._adapters_outside_trainer_checkpoint():
            sharding.load_adapters(adapter_parameters(self.model), checkpoint.sharded_adapters(folder))
        self.method.restore(state.steps, state.buffer, state.task_loss)
        self.method.load_state(*state.method_state)

    # ---------------------------------------------------------------- output
    def save_task(self, output_dir: str | Path | None = None) -> Path:
        """Write the adapters the method saves, the buffer, the method's state and the manifest, so the
        next task can start from them (every rank calls this: each saves its buffer, rank 0 the rest)."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.method.check_diverged("by the end of the task", adapters=True, outputs=True)  # nothing diverged is written
        method_cls = type(self.method)
        previous = list(self.previous.adapters) if self.previous else []
        targets = taskdir.adapter_targets(output_dir, method_cls, self.method_options, previous, bool(self.previous))
        return taskdir.write_task(
            output_dir, self.model, self.method.buffer, self._record(), targets, self.method.state()
        )

    def _record(self) -> taskdir.TaskRecord:
        summary = next((e for e in reversed(self.state.log_history) if "train_loss" in e), {})
        options = self.method_options
        return taskdir.TaskRecord(
            method=self.method.name,
            task_id=self.continual_args.current_task_id,
            prev_task_id=self.previous.task_id if self.previous else None,
            base_model=self.base_identity,
            lora=self.lora_identity,
            sequence_steps=self.method.step,
            global_steps=self.state.global_step,
            continual_args=dataclasses.asdict(self.continual_args),
            method_options=dataclasses.asdict(options) if options is not None else None,
            train_seconds=summary.get("train_runtime"),
            hardware=precision.run_record(self.args),
            quantization=self.quantization,
            final_losses=self._final_losses(),
            collapse_check={k: float(v) for k, v in self.method.collapse_figures.items()},  # this rank's last batch
            # ZeRO-3 partitions keep the whole size in ds_numel; DTensors (FSDP2) report the whole size
            trainable_parameters=sum(getattr(t, "ds_numel", t.numel()) for t in self.method.trained_tensors()),
            rows_replayed=self.method.rows_replayed,
        )

    def _final_losses(self) -> dict[str, float]:
        """The means over the steps since the last log (or that log, if nothing came after it) of the loss
        and every term the method logs (ce_loss, consistency_loss, ewc_penalty, ...), and the whole task's
        mean loss as train_loss, a resumed task's included."""
        last_log = next((e for e in reversed(self.state.log_history) if "loss" in e), {})
        losses = {k: v for k, v in last_log.items() if k not in ("grad_norm", "learning_rate", "epoch", "step")}
        losses.update(self.method.pop_logs())
        task_loss = self.method.task_loss()
        if task_loss["micro_batches"]:
            losses["train_loss"] = task_loss["sum"] / task_loss["micro_batches"]
        return losses


class ILoRATrainer(ContinualTrainerMixin, Trainer):
    """A drop-in `transformers.Trainer` that trains any ilora method (I-LoRA by default). Rows may be
    tokenized (`input_ids`, `labels`) or raw in any format `ilora.data.formats` reads; they are encoded
    with the loss on the assistant's tokens, `cutoff_len` tokens at most."""

    def __init__(self, *args: Any, cutoff_len: int = 1024, use_chat_template: bool = True, **kwargs: Any):
        self._encoding = (cutoff_len, use_chat_template)
        super().__init__(*args, **kwargs)

    def _training_data(self, dataset, tokenizer, collator, pad_token_id: int):
        if dataset is not None:
            dataset = prepare_dataset(dataset, tokenizer, *self._encoding)
        return dataset, collator or PadCollator(pad_token_id)


@contextlib.contextmanager
def _only_tensors(checkpoint):
    """The Trainer reads its checkpoint files with weights-only unpickling: a file carrying anything
    else (a crafted pickle) is refused there; say so in one line, naming the checkpoint."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "UnpicklingError":
            raise
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ILoRAError(
            f"{checkpoint}: a file holds objects other than tensors ({first}); ilora never runs code "
            "from a checkpoint: resume from another one"
        ) from None


def _pad_token_id(tokenizer, model) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def _options(method_cls, given):
    """The method's own options: as given (of its class), or its defaults."""
    if method_cls.Arguments is None:
        if given is not None:
            raise ILoRAError(f"method {method_cls.name} takes no options, got {type(given).__name__}")
        return None
    if given is None:
        return method_cls.Arguments()
    if not isinstance(given, method_cls.Arguments):
        raise ILoRAError(f"method {method_cls.name} takes {method_cls.Arguments.__name__}, got {type(given).__name__}")
    return given


def buffer_spec(continual: ContinualArguments) -> BufferSpec:
    """The replay buffer the settings ask for."""
    capacity, unit = continual.replay_budget()
    return BufferSpec(capacity, continual.replay_policy, unit)
