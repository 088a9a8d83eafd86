"""Running tasks: one chained task (`train_task`, behind `ilora train`)."""

from __future__ import annotations

import logging
from pathlib import Path

from peft import LoraConfig
from transformers import TrainingArguments

from . import taskdir
from .config import DataArguments, ILoRAArguments, ModelArguments
from .data import encode_rows, read_jsonl
from .errors import ILoRAError
from .loader import load_model_and_tokenizer
from .trainer import ILoRATrainer

log = logging.getLogger(__name__)


def lora_config(model_args: ModelArguments) -> LoraConfig:
    return LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        task_type="CAUSAL_LM",
    )


def check_output_dir(output_dir: str | None, overwrite: bool) -> Path:
    if not output_dir:
        raise ILoRAError("--output_dir is required")
    path = Path(output_dir)
    if taskdir.is_finished(path) and not overwrite:
        raise ILoRAError(f"output_dir {path} already holds a finished task; pass --overwrite_output_dir to replace it")
    return path


def train_task(
    model_args: ModelArguments,
    data_args: DataArguments,
    ilora_args: ILoRAArguments,
    training_args: TrainingArguments,
) -> Path:
    """Train one task, starting from `ilora_args.previous_task_model` if given, and write its outputs."""
    output_dir = check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    if not model_args.model_name_or_path:
        raise ILoRAError("--model (or --model_name_or_path) is required")
    if not data_args.dataset:
        raise ILoRAError("--dataset is required")
    rows = read_jsonl(data_args.dataset)  # bad data fails before the model is loaded
    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, model_args.trust_remote_code)
    examples = encode_rows(rows, tokenizer, data_args.cutoff_len, data_args.use_chat_template, data_args.dataset)
    trainer = ILoRATrainer(
        model=model,
        args=training_args,
        ilora_args=ilora_args,
        peft_config=lora_config(model_args),
        train_dataset=examples,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_task(output_dir)
    log.info("task %s finished: %s", ilora_args.current_task_id, output_dir)
    return output_dir
