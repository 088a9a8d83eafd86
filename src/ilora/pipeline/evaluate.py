"""`ilora eval`: score a finished task (what its method evaluates: plastic and stable for I-LoRA, every
task's LoRA summed for O-LoRA), a PEFT adapter directory, or a folder of them, on a run config's tasks."""

from __future__ import annotations

from pathlib import Path

from ilora.core.adapters import ADAPTER_CONFIG, PLASTIC, AdapterPair, check_adapter_dir, load_saved_adapters
from ilora.data.formats import read_data
from ilora.errors import ILoRAError
from ilora.evaluation.scoring import Scorer, subsample, test_set_of
from ilora.methods.base import evaluating
from ilora.pipeline.models import on_device, open_task
from ilora.pipeline.sequence import load_run_config
from ilora.runtime import precision
from ilora.runtime.loader import load_model_and_tokenizer
from ilora.store import taskdir


def evaluate_adapters(model_name: str, adapter_dir: Path, config: Path) -> dict[str, dict[str, float]]:
    """{report: {task: accuracy}} of the adapters at `adapter_dir` on `config`'s tasks, on base `model_name`."""
    settings = load_run_config(config)
    model_args, training = settings.model, settings.training
    test_rows = _test_rows(settings)  # bad data fails before the model is loaded
    if taskdir.is_finished(adapter_dir):
        task = open_task(adapter_dir, model_name, model_args.trust_remote_code, training.device)
        model, tokenizer = task.model, task.tokenizer
        evaluated = {
            name: (lambda name=name: evaluating(task.method, model, name, task.options)) for name in task.reports()
        }
    else:
        adapters = _adapter_dirs(adapter_dir)
        for directory in adapters.values():
            check_adapter_dir(directory)
        base, tokenizer = load_model_and_tokenizer(model_name, model_args.trust_remote_code)
        model = on_device(load_saved_adapters(base, adapters), training.device)  # checked to fit `base` first
        evaluated = {name: (lambda name=name: _active(model, name)) for name in adapters}
    scorer = _scorer(settings, test_rows, tokenizer)
    scores = {}
    for name, context in evaluated.items():
        with context():
            scores[name] = {task: r["accuracy"] for task, r in scorer.score(model, label=name).items()}
    return scores


def _adapter_dirs(directory: Path) -> dict[str, Path]:
    """A PEFT adapter directory (scored as plastic), or a folder of them (each scored by its name)."""
    if (directory / ADAPTER_CONFIG).is_file():
        return {PLASTIC: directory}
    if (directory / PLASTIC / ADAPTER_CONFIG).is_file():
        return {p.name: p for p in sorted(directory.iterdir()) if (p / ADAPTER_CONFIG).is_file()}
    raise ILoRAError(f"{directory}: neither a PEFT adapter directory nor an ilora task directory")


def _active(model, name: str):
    return AdapterPair(model).active(name)


def _test_rows(settings) -> dict[str, list[dict]]:
    run = settings.run
    return {
        t.name: subsample(read_data(t.test, t.dataset_dir, t.columns).to_list(), run.eval_max_rows) for t in run.tasks
    }


def _scorer(settings, test_rows: dict[str, list[dict]], tokenizer) -> Scorer:
    run, data, training = settings.run, settings.data, settings.training
    tests = [test_set_of(t, test_rows[t.name], tokenizer, data.cutoff_len, data.use_chat_template) for t in run.tasks]
    autocast = precision.autocast_dtype(training.bf16, training.fp16)
    return Scorer(tokenizer, tests, run.eval_batch_size, run.max_new_tokens, autocast, training.disable_tqdm)
