"""A run that starts from an adapter trained elsewhere (`start_from`: a PEFT LoRA directory, such as
LLaMA-Factory's output), instead of from the bare base.

The adapter becomes a task directory of the run, `start`, written as ilora writes a task (its plastic
and stable adapters are the adapter; no step is trained), and the first task of the config chains from
it. `start_from_data` seeds the replay buffer with the rows it was trained on. With `start_from_test`,
`start` is the first task of the sequence, with its own column in the accuracy matrix (its forgetting
is reported as any task's); without, it is the model the sequence starts from: row 0 of the matrix is
its scores, not the bare base's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ilora.config.arguments import START, TaskSpec
from ilora.config.parse import Settings
from ilora.core.adapters import ADAPTER_CONFIG, load_first_adapter
from ilora.data.encode import encode_rows
from ilora.data.formats import read_data
from ilora.errors import ILoRAError
from ilora.files import read_json
from ilora.pipeline.models import load_base
from ilora.store import taskdir
from ilora.trainer import ILoRATrainer

# ModelArguments keys set from the adapter's adapter_config.json when the run does not set them
LORA_KEYS = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_target": "target_modules"}


def with_start(settings: Settings, joint: bool) -> Settings:
    """The settings of a run with `start_from`: its LoRA settings those of the adapter (a key the run sets
    must agree), and task `start` first when it has test rows."""
    run = settings.run
    if not run.start_from:
        return settings
    if joint:
        raise ILoRAError("start_from with joint training: joint training has no sequence to continue")
    if any(t.name == START for t in run.tasks):
        raise ILoRAError(f"a task is named {START!r}, the name start_from's task takes: rename it")
    model = dataclasses.replace(settings.model, **_lora_of(Path(run.start_from), settings))
    if not run.start_from_test:
        return dataclasses.replace(settings, model=model)
    train = run.start_from_data or run.start_from_test  # recorded by content only: start is not trained
    task = TaskSpec(START, train=train, test=run.start_from_test, scoring=_scoring(run.start_from_test))
    return dataclasses.replace(settings, model=model, run=dataclasses.replace(run, tasks=[task, *run.tasks]))


def _lora_of(directory: Path, settings: Settings) -> dict:
    """ModelArguments values the adapter implies; a value the run set that disagrees is one line."""
    config = read_json(directory / ADAPTER_CONFIG, "adapter config") if (directory / ADAPTER_CONFIG).exists() else None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise ILoRAError(f"start_from {directory}: not a PEFT LoRA adapter directory (no {ADAPTER_CONFIG} with 'r')")
    for key in ("use_dora", "use_rslora", "modules_to_save"):
        if config.get(key):
            raise ILoRAError(f"start_from {directory}: {key} is set; ilora continues plain LoRA adapters")
    targets = config.get("target_modules")
    adapter = {
        "lora_rank": config["r"],
        "lora_alpha": config.get("lora_alpha", 8),
        "lora_target": "all" if targets == "all-linear" else ",".join(sorted(targets or [])),
    }
    values = {}
    for key, value in adapter.items():
        given = getattr(settings.model, key)
        if key in settings.given and _normal(key, given) != _normal(key, value):
            raise ILoRAError(
                f"{key}={given!r} but start_from {directory} was trained with {LORA_KEYS[key]}={value!r}: "
                f"leave {key} out (the run takes the adapter's) or set it to the adapter's"
            )
        values[key] = value
    return values


def _normal(key: str, value):
    return ",".join(sorted(v.strip() for v in value.split(","))) if key == "lora_target" else value


def _scoring(test_file: str) -> str:
    """`choice` where the test rows carry their choices, else `exact_match`."""
    rows = read_data(test_file)
    return "choice" if all(row.get("choices") for row in rows.to_list()) else "exact_match"


def import_start(settings: Settings, directory: Path, tokenizer) -> None:
    """Write `start_from` as the run's task `start` in `directory`: its adapters as trained elsewhere, the
    replay buffer seeded with `start_from_data`, no step trained."""
    run = settings.run
    examples = None
    if run.start_from_data:
        rows = read_data(run.start_from_data)
        data = settings.data
        examples = encode_rows(rows, tokenizer, data.cutoff_len, data.use_chat_template, "start_from_data")
    continual = dataclasses.replace(settings.continual, current_task_id=START)
    training = dataclasses.replace(settings.training, output_dir=str(directory), resume_from_checkpoint=None)
    taskdir.planned_outputs(str(directory), _method(settings), continual, settings.method_options, overwrite=True)
    base, _ = load_base(settings.model, settings.training)
    trainer = ILoRATrainer(
        model=load_first_adapter(base, Path(run.start_from), trainable=True),
        args=training,
        continual_args=continual,
        method_options=settings.method_options,
        train_dataset=examples,
        processing_class=tokenizer,
    )
    if examples is not None:
        trainer.method.seed_replay(trainer.task_batches())
    trainer.save_task(directory)


def start_model(settings: Settings, base):
    """The model a run without `start_from_test` starts from: the base with the adapter (row 0)."""
    return load_first_adapter(base, Path(settings.run.start_from), trainable=False)


def _method(settings: Settings):
    from ilora import methods

    return methods.get(settings.method)
