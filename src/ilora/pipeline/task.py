"""`ilora train`: one task, chained to the previous one if given, in this order: settings checked, paths
checked, data read, base loaded, rows encoded, trained, written. Everything a task reads, every path it
writes and every file it continues from is checked before the model loads."""

from __future__ import annotations

import logging
from pathlib import Path

from ilora import methods
from ilora.config.parse import Settings, parse_train_args
from ilora.core.adapters import check_target_modules
from ilora.data.encode import encode_rows
from ilora.data.formats import read_data
from ilora.errors import ILoRAError
from ilora.pipeline.models import load_base, lora_config
from ilora.runtime import policy
from ilora.store import taskdir
from ilora.trainer import ILoRATrainer

log = logging.getLogger(__name__)


def parse(argv: list[str]) -> Settings:
    """`ilora train`'s flags or config, with every registered method's options."""
    return parse_train_args(argv, methods.argument_classes())


def train_task(settings: Settings) -> Path:
    """Train one task, starting from `previous_task_model` if given, and write its outputs."""
    method = check_method(settings, refuse_others=True)  # before anything else
    policy.check_sharding(settings.training, settings.model.quantization is not None, method)
    output_dir = taskdir.planned_outputs(
        settings.training.output_dir,
        method,
        settings.continual,
        settings.method_options,
        settings.data.overwrite_output_dir,
        resume_path(settings.training.resume_from_checkpoint),
    ).output_dir
    if not settings.model.model_name_or_path:
        raise ILoRAError("--model (or --model_name_or_path) is required")
    if not settings.data.dataset:
        raise ILoRAError("--dataset is required")
    rows = read_data(settings.data.dataset, settings.data.dataset_dir)  # bad data fails before the model loads
    model, tokenizer = load_base(settings.model, settings.training)
    check_target_modules(model, settings.model.target_modules)
    data = settings.data
    examples = encode_rows(rows, tokenizer, data.cutoff_len, data.use_chat_template, data.dataset)
    trainer = train(model, tokenizer, examples, settings)
    trainer.save_task(output_dir)
    return output_dir


def check_method(settings: Settings, refuse_others: bool):
    """The chosen method's class. An option the user set for another method does nothing: `ilora train`
    refuses it; `ilora run` (one config, run with several methods) says in the log that it is ignored."""
    method = methods.get(settings.method)  # an unknown method is refused here, before anything is read
    for name, keys in settings.foreign_options().items():
        message = (
            f"{', '.join(keys)} {'applies' if len(keys) == 1 else 'apply'} to method {name}, not {settings.method}"
        )
        if refuse_others:
            raise ILoRAError(f"{message}: drop {'it' if len(keys) == 1 else 'them'}, or train with --method {name}")
        log.warning("%s: ignored in this run", message)
    return method


def train(model, tokenizer, examples, settings: Settings) -> ILoRATrainer:
    """The Trainer over `examples`, trained (from the checkpoint `resume_from_checkpoint` names, if any)."""
    trainer = ILoRATrainer(
        model=model,
        args=settings.training,
        continual_args=settings.continual,
        method_options=settings.method_options,
        peft_config=lora_config(settings.model),
        train_dataset=examples,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=settings.training.resume_from_checkpoint)
    return trainer


def resume_path(value) -> str | None:
    return None if value in (None, False, "", "false", "False") else str(value)
