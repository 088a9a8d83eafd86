"""Running tasks: one chained task (`train_task`, behind `ilora train`) and a whole sequence with
evaluation after every task (`run_sequence`, behind `ilora run`).

A sequence writes a run directory (see rundir) holding one task directory per task (see taskdir).
Re-running the same command skips every task whose directory is finished and evaluated, provided the
run's settings and inputs are unchanged. Everything a command reads, every path it writes and every
file it continues from is checked before training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import TrainingArguments

from ilora import methods
from ilora.config.parse import (
    DataArguments,
    ILoRAArguments,
    ModelArguments,
    RunArguments,
    TaskSpec,
    parse_run_config,
    scored_tasks,
    zero3_requested,
)
from ilora.core.adapters import PLASTIC, AdapterPair, check_target_modules, load_saved_adapters
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import encode_rows
from ilora.data.formats import read_data
from ilora.errors import ILoRAError
from ilora.evaluation import general, report
from ilora.evaluation.scoring import TestSet, build_test_set, evaluate
from ilora.files import write_json
from ilora.runtime import distributed, precision, sharding
from ilora.runtime.loader import load_model_and_tokenizer, quantization_of
from ilora.store import rundir, taskdir
from ilora.store.paths import check_directory_target, check_trainer_outputs
from ilora.trainer import ILoRATrainer, check_fsdp, check_zero3, requested_fsdp

log = logging.getLogger(__name__)


def lora_config(model_args: ModelArguments) -> LoraConfig:
    return LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        task_type="CAUSAL_LM",
    )


# ------------------------------------------------------------- one task
def train_task(
    model_args: ModelArguments,
    data_args: DataArguments,
    ilora_args: ILoRAArguments,
    training_args: TrainingArguments,
    options: dict | None = None,
) -> Path:
    """Train one task, starting from `ilora_args.previous_task_model` if given, and write its outputs."""
    method_options = chosen_options(ilora_args.method, options, refuse_others=True)  # before anything else
    _check_sharding(training_args, model_args, methods.get(ilora_args.method))
    outputs = taskdir.planned_outputs(
        training_args.output_dir,
        ilora_args,
        data_args.overwrite_output_dir,
        _resume_path(training_args.resume_from_checkpoint),
    )
    output_dir = outputs.output_dir
    if not model_args.model_name_or_path:
        raise ILoRAError("--model (or --model_name_or_path) is required")
    if not data_args.dataset:
        raise ILoRAError("--dataset is required")
    rows = read_data(data_args.dataset, data_args.dataset_dir)  # bad data fails before the model is loaded
    model, tokenizer = load_base(model_args, training_args)
    check_target_modules(model, model_args.target_modules)
    examples = encode_rows(rows, tokenizer, data_args.cutoff_len, data_args.use_chat_template, data_args.dataset)
    trainer = _train(model, tokenizer, examples, model_args, ilora_args, training_args, method_options)
    trainer.save_task(output_dir)
    return output_dir


def chosen_options(method: str, options: dict | None, refuse_others: bool):
    """The chosen method's options. An option set for another method does nothing: `ilora train`
    refuses it; `ilora run` (one config, run with several methods) says so in the log."""
    methods.get(method)  # an unknown method is refused here, before anything is read or written
    for name, given in (options or {}).items():
        if name == method:
            continue
        default = type(given)()
        changed = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(default, f.name)]
        if changed:
            message = f"{changed[0]}={getattr(given, changed[0])} applies to method {name}, not {method}"
            if refuse_others:
                raise ILoRAError(f"{message}: drop it, or train with --method {name}")
            log.warning("%s: ignored in this run", message)
    return (options or {}).get(method)


def _check_sharding(training_args: TrainingArguments, model_args: ModelArguments, method) -> None:
    """FSDP and ZeRO-3 settings ilora cannot train with are refused before anything is read or written."""
    if zero3_requested(training_args):
        check_zero3(method, model_args.quantization is not None)
    requested = requested_fsdp(training_args)
    if requested is None:
        return
    check_fsdp(*requested, model_args.quantization is not None)
    if training_args.world_size < 2:
        raise ILoRAError(
            "fsdp shards over several processes: launch with torchrun --nproc_per_node N (or accelerate launch)"
        )


def load_base(model_args: ModelArguments, training_args: TrainingArguments):
    """The base model and tokenizer as the arguments ask: full precision, or quantized (QLoRA), its
    4-bit layers computing in the training precision."""
    compute = precision.autocast_dtype(training_args.bf16, training_args.fp16) or torch.float32
    return load_model_and_tokenizer(
        model_args.model_name_or_path,
        model_args.trust_remote_code,
        quantization=model_args.quantization,
        compute_dtype=compute,
    )


def on_device(model, device):
    """A model on `device`; a quantized one stays where bitsandbytes placed it (it cannot be moved)."""
    return model if quantization_of(model) else model.to(device)


def _resume_path(value) -> str | None:
    return None if value in (None, False, "", "false", "False") else str(value)


def _train(model, tokenizer, examples, model_args, ilora_args, training_args, method_options) -> ILoRATrainer:
    trainer = ILoRATrainer(
        model=model,
        args=training_args,
        ilora_args=ilora_args,
        peft_config=lora_config(model_args),
        train_dataset=examples,
        processing_class=tokenizer,
        method_options=method_options,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


# --------------------------------------------------------- the sequence
def method_arguments(method: str, ilora_args: ILoRAArguments) -> ILoRAArguments:
    """The run's method wins over the legacy switches (use_ilora, use_stable_adapter)."""
    return dataclasses.replace(ilora_args, method=method, use_ilora=True, use_stable_adapter=True)


def joint_training_arguments(
    training_args: TrainingArguments, ilora_args: ILoRAArguments, task_sizes: list[int]
) -> TrainingArguments:
    """Joint training gets the sequence's optimizer steps, each on as many rows as a replay step
    (current + replay batch), so the upper bound sees as many rows as ER and I-LoRA do, not half."""
    batch = training_args.per_device_train_batch_size
    rows_per_step = batch * distributed.world_size() * training_args.gradient_accumulation_steps
    if training_args.max_steps > 0:
        steps = training_args.max_steps * len(task_sizes)
    else:
        steps_per_epoch = sum(math.ceil(n / rows_per_step) for n in task_sizes)
        steps = math.ceil(training_args.num_train_epochs * steps_per_epoch)
    replay = (ilora_args.replay_batch_size or batch) if ilora_args.ilora_buffer_size > 0 else 0
    return dataclasses.replace(training_args, max_steps=steps, per_device_train_batch_size=batch + replay)


def run_sequence(
    model_args: ModelArguments,
    data_args: DataArguments,
    ilora_args: ILoRAArguments,
    training_args: TrainingArguments,
    run: RunArguments,
    options: dict | None = None,
) -> Path:
    """Train the tasks in order (or all at once for `joint`), evaluating every task after each.
    `options`: the methods' own options by method name (defaults where absent)."""
    started = time.time()
    method = methods.get(run.method)
    root = Path(training_args.output_dir)
    run_dir = root / run.method
    check_directory_target(root, "output_dir")
    rundir.check_run_dir(run_dir)
    method_args = method_arguments(run.method, ilora_args)
    method_options = chosen_options(run.method, options, refuse_others=False)  # one config may serve several methods
    _check_sharding(training_args, model_args, method)
    adapters = method.reports(method_args)  # what is scored: plastic, and stable for I-LoRA

    train_rows = {t.name: read_data(t.train, t.dataset_dir, t.columns) for t in run.tasks}  # all data errors first
    test_rows = {
        t.name: subsample(read_data(t.test, t.dataset_dir, t.columns).to_list(), run.eval_max_rows) for t in run.tasks
    }
    general_text = general.read_text(run.general) if run.general else None
    if method.trains_jointly:
        training_args = joint_training_arguments(
            training_args, ilora_args, [len(train_rows[t.name]) for t in run.tasks]
        )
    config = rundir.config_record(model_args, data_args, method_args, training_args, run, method_options)
    base, tokenizer = load_base(model_args, training_args)
    check_target_modules(base, model_args.target_modules)
    tests = [_test_set(t, test_rows[t.name], tokenizer, data_args) for t in run.tasks]
    identity = taskdir.base_model_identity(base)
    settings = {
        **rundir.settings_record(config),
        "inputs": rundir.inputs_record(identity["fingerprint"], tokenizer, run.tasks, run.general),
    }
    rundir.check_same_settings(run_dir, settings)
    stages = [run.tasks] if method.trains_jointly else [[t] for t in run.tasks]
    names = rundir.stage_dir_names(run.method, [t.name for t in run.tasks], method.trains_jointly)
    task_dirs = [run_dir / rundir.TASKS_DIR / name for name in names]
    rows = {t.name: len(t) for t in tests}
    # the test sets scored after each stage, and their row counts (what each eval.json must hold)
    scored = [
        _rows_of(rows, scored_tasks(list(rows), k, k == len(stages), run.eval_tasks)) for k in range(1, len(stages) + 1)
    ]
    for task_dir, due in zip(task_dirs, scored):  # damaged state is found now, not after hours of training
        _check_saved_task(task_dir, adapters, due, method.uses_replay(method_args))
    if distributed.rank() == 0:
        write_json(run_dir / rundir.SETTINGS_FILE, settings)  # once model and test sets load: bad input leaves nothing
    autocast = precision.autocast_dtype(training_args.bf16, training_args.fp16)  # evaluation as trained
    windows = (
        general.windows(general_text, tokenizer, data_args.cutoff_len, run.general_windows, f"general: {run.general}")
        if general_text
        else None
    )
    scorer = _Scorer(
        tokenizer, tests, run.eval_batch_size, run.max_new_tokens, autocast, training_args.disable_tqdm, windows
    )
    evaluates = distributed.rank() == 0  # the other ranks train, then wait
    base_row, base_general = None, None
    if evaluates:  # scored where the tasks will be scored: the Trainer's device
        base_row = _base_evaluation(
            root, on_device(base, training_args.device), identity, scorer, run.tasks, data_args, settings["inputs"]
        )
        base_general = _base_general(root, base, identity, scorer, settings["inputs"], data_args.cutoff_len)
    del base  # each task loads its own: holding this one (on rank 0's device) through training would double its memory
    distributed.barrier()

    results, timings, previous = [], [], None
    for k, (stage, task_dir) in enumerate(zip(stages, task_dirs), start=1):
        name = _stage_name(run, stage)
        if taskdir.is_finished(task_dir) and (task_dir / rundir.EVAL_FILE).is_file():
            log.info("task %d/%d %s: finished earlier, skipped", k, len(stages), name)
        else:
            _train_and_evaluate(
                k,
                stage,
                name,
                task_dir,
                previous,
                train_rows,
                tokenizer,
                scorer,
                list(scored[k - 1]),
                method,
                model_args,
                data_args,
                method_args,
                training_args,
                method_options,
            )
        previous = (task_dir, name)
        if not evaluates:
            continue
        saved = rundir.read_eval(task_dir / rundir.EVAL_FILE, adapters, scored[k - 1], general=windows is not None)
        results.append(saved)
        timings.append(saved["timings"])
        log.info(_summary_line(k, len(stages), name, saved, adapters, list(scored[k - 1])))

    if not evaluates:
        return run_dir
    summary = rundir.summary(
        run, adapters, base_row, results, timings, time.time() - started, tests, method.trains_jointly
    )
    if windows is not None:
        summary["general"] = rundir.general_summary(run, windows, base_general, results, adapters)
    summary["config"] = config
    summary["hardware"] = precision.run_record(training_args)
    summary["inputs"] = settings["inputs"]  # lets `ilora compare` refuse runs scored on other test files
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / rundir.METRICS_FILE, summary)
    report.write_report(run_dir, summary)
    return run_dir


def _rows_of(rows: dict[str, int], names: list[str]) -> dict[str, int]:
    return {name: rows[name] for name in names}


def subsample(rows: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most `limit` rows, drawn once with a fixed seed and kept in file order: the same subsample
    after every task and in every run of the same file."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _stage_name(run: RunArguments, stage: list[TaskSpec]) -> str:
    return run.method if len(stage) > 1 else stage[0].name


def _stage_rows(parts: list):
    """A stage's training rows: one task's, or every task's for joint training."""
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_saved_task(task_dir: Path, adapters: list[str], rows: dict[str, int], replay: bool) -> None:
    """A finished task's manifest, adapters, buffer and evaluation, and an unfinished one's
    checkpoints, read now: a damaged file is one line naming it before any training starts."""
    if taskdir.is_finished(task_dir):
        manifest = taskdir.read_manifest(task_dir)
        for path in taskdir.saved_adapters(task_dir, manifest).values():
            taskdir.check_adapter_dir(path, manifest["lora"])
        if replay:
            ReplayBuffer.load(taskdir.buffer_path(task_dir / "buffer"))
        if (task_dir / rundir.EVAL_FILE).exists():
            rundir.read_eval(task_dir / rundir.EVAL_FILE, adapters, rows)
    elif task_dir.is_dir():
        check_trainer_outputs(task_dir)
        checkpoint = taskdir.last_complete_checkpoint(task_dir)
        if checkpoint is not None:
            taskdir.read_json(checkpoint / taskdir.CHECKPOINT_MARKER, "checkpoint marker")


def _train_and_evaluate(
    k,
    stage,
    name,
    task_dir,
    previous,
    train_rows,
    tokenizer,
    scorer,
    scored,
    method,
    model_args,
    data_args,
    method_args,
    training_args,
    method_options,
) -> None:
    """Train the stage unless its task directory is finished; rank 0 then scores the test sets `scored`."""
    began = time.time()
    model = None
    if taskdir.is_finished(task_dir):  # trained, but the evaluation was interrupted
        train_seconds = taskdir.read_manifest(task_dir).get("train_seconds") or 0.0  # absent in older manifests
    else:
        rows = _stage_rows([train_rows[task.name] for task in stage])
        examples = encode_rows(rows, tokenizer, data_args.cutoff_len, data_args.use_chat_template, f"task {name}")
        task_args = dataclasses.replace(
            method_args,
            previous_task_model=str(previous[0]) if previous else None,
            prev_task_id=previous[1] if previous else None,
            current_task_id=name,
            ema_adapter_path=None,
        )
        checkpoint = taskdir.last_complete_checkpoint(task_dir)  # a crash mid-task: continue from there
        if checkpoint is not None:
            log.info("task %d %s: resuming from %s", k, name, checkpoint)
        # the run owns its task directories: leftovers of an interrupted write may be replaced
        taskdir.planned_outputs(str(task_dir), task_args, overwrite=True)
        task_training = dataclasses.replace(
            training_args, output_dir=str(task_dir), resume_from_checkpoint=str(checkpoint) if checkpoint else None
        )
        base, _ = load_base(model_args, training_args)
        trainer = _train(base, tokenizer, examples, model_args, task_args, task_training, method_options)
        train_seconds = time.time() - began
        trainer.save_task(task_dir)
        # a sharded model cannot be scored by rank 0 alone: it is scored whole, read back from the task
        model = None if sharding.is_sharded(trainer.model) else trainer.model
        del trainer
    if distributed.rank() == 0:
        eval_began = time.time()
        if model is None:
            model = _saved_task_model(task_dir, model_args, training_args)
        evaluated = method.evaluated(model, method_args)
        scores = {report: scorer.score(model, names, scored) for report, names in evaluated.items()}
        record = {"scores": scores}
        if scorer.windows is not None:
            record["general"] = {report: scorer.perplexity(model, names) for report, names in evaluated.items()}
        record["timings"] = {"train_seconds": train_seconds, "eval_seconds": time.time() - eval_began}
        write_json(task_dir / rundir.EVAL_FILE, record)
    distributed.barrier()


def _saved_task_model(task_dir: Path, model_args: ModelArguments, training_args: TrainingArguments):
    """The base model with every adapter the task saved, on the training device."""
    base, _ = load_base(model_args, training_args)
    adapters = taskdir.saved_adapters(task_dir, taskdir.read_manifest(task_dir))
    return on_device(load_saved_adapters(base, adapters), training_args.device)


class _Scorer:
    """Every test set, scored for one adapter of a model (the base model when `adapter` is None)."""

    def __init__(
        self,
        tokenizer,
        tests: list[TestSet],
        batch_size: int,
        max_new_tokens: int,
        autocast,
        quiet: bool = False,
        windows: list[list[int]] | None = None,
    ):
        self.tokenizer, self.tests, self.windows = tokenizer, tests, windows
        self.batch_size, self.max_new_tokens, self.autocast = batch_size, max_new_tokens, autocast
        self.quiet = quiet  # the Trainer's disable_tqdm: no progress bars at all

    def score(self, model, adapters: list[str] | None, only: list[str] | None = None) -> dict[str, dict]:
        """Every test set (or those named in `only`), with `adapters` summed in the forward (the base
        model when None)."""
        results = {}
        label = "+".join(adapters) if adapters else "base"
        tests = [t for t in self.tests if only is None or t.name in only]
        for test in tqdm(tests, desc=f"eval {label}", leave=False, disable=self.quiet):
            if adapters is None:
                results[test.name] = self._evaluate(model, test)
            else:
                with AdapterPair(model).active(adapters):
                    results[test.name] = self._evaluate(model, test)
        return results

    def perplexity(self, model, adapters: list[str] | None) -> float:
        """Perplexity on the general text's windows, with `adapters` summed (the base model when None)."""
        if adapters is None:
            return general.perplexity(model, self.windows, self.batch_size, self.autocast)
        with AdapterPair(model).active(adapters):
            return general.perplexity(model, self.windows, self.batch_size, self.autocast)

    def _evaluate(self, model, test):
        return evaluate(model, self.tokenizer, test, self.batch_size, self.max_new_tokens, self.autocast)


def _test_set(task: TaskSpec, rows, tokenizer, data_args: DataArguments) -> TestSet:
    return build_test_set(
        task.name,
        rows,
        tokenizer,
        task.scoring,
        task.choices,
        data_args.cutoff_len,
        data_args.use_chat_template,
        task.test,
    )


def _base_general(root: Path, base, identity: dict, scorer: _Scorer, inputs: dict, cutoff_len: int) -> float | None:
    """The base model's perplexity on the general text, cached beside base_eval.json."""
    if scorer.windows is None:
        return None
    key = {"model": identity, "general": inputs["general"], "windows": len(scorer.windows), "cutoff_len": cutoff_len}
    path = root / rundir.GENERAL_BASE_FILE
    cached = rundir.read_general_base(path, key)
    if cached is not None:
        return cached
    value = scorer.perplexity(base, None)
    write_json(path, {"key": key, "perplexity": value})
    return value


def _base_evaluation(
    root: Path, base, identity: dict, scorer: _Scorer, tasks: list[TaskSpec], data_args: DataArguments, inputs: dict
) -> dict:
    """Row 0 of the accuracy matrix. Shared by every method run from one config, so computed once."""
    key = {
        "model": identity,
        "tasks": [dataclasses.asdict(t) for t in tasks],
        "test_files": inputs["test"],
        "cutoff_len": data_args.cutoff_len,
        "use_chat_template": data_args.use_chat_template,
    }
    path = root / rundir.BASE_EVAL_FILE
    rows = {t.name: len(t) for t in scorer.tests}
    cached = rundir.read_base_eval(path, key, rows)
    if cached is not None:
        return cached
    scores = scorer.score(base, None)
    root.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "scores": scores})
    return scores


def _summary_line(k, count, name, saved, adapters, names) -> str:
    parts = []
    for adapter in adapters:
        accs = " ".join(f"{n}={saved['scores'][adapter][n]['accuracy']:.3f}" for n in names)
        parts.append(f"{adapter}: {accs}")
    seconds = saved["timings"]
    return (
        f"task {k}/{count} {name}: train {seconds['train_seconds']:.0f}s, eval {seconds['eval_seconds']:.0f}s | "
        + " | ".join(parts)
    )


# ------------------------------------------------------------ ilora eval
def evaluate_adapters(model_name: str, adapter_dir: Path, config: Path) -> dict:
    """Accuracy per task of a PEFT adapter directory, or of what an ilora task directory's method
    evaluates (plastic and stable for I-LoRA; every task's LoRA summed for O-LoRA)."""
    _, data_args, ilora_args, training_args, run, _ = load_run_config(config)
    manifest = None
    if (adapter_dir / taskdir.ADAPTER_CONFIG).is_file():
        adapters = {PLASTIC: adapter_dir}
    elif taskdir.is_finished(adapter_dir):
        manifest = taskdir.read_manifest(adapter_dir)
        adapters = taskdir.saved_adapters(adapter_dir, manifest)
    elif (adapter_dir / PLASTIC / taskdir.ADAPTER_CONFIG).is_file():  # adapters without a manifest
        adapters = {p.name: p for p in sorted(adapter_dir.iterdir()) if (p / taskdir.ADAPTER_CONFIG).is_file()}
    else:
        raise ILoRAError(f"{adapter_dir}: neither a PEFT adapter directory nor an ilora task directory")
    for directory in adapters.values():
        taskdir.check_adapter_dir(directory, manifest["lora"] if manifest else None)
    test_rows = {
        t.name: subsample(read_data(t.test, t.dataset_dir, t.columns).to_list(), run.eval_max_rows) for t in run.tasks
    }
    base, tokenizer = load_model_and_tokenizer(
        model_name, quantization=manifest.get("quantization") if manifest else None
    )
    if manifest is not None:
        taskdir.check_identity(manifest, adapter_dir, taskdir.base_model_identity(base, tokenizer))
    tests = [_test_set(t, test_rows[t.name], tokenizer, data_args) for t in run.tasks]
    scorer = _Scorer(
        tokenizer,
        tests,
        run.eval_batch_size,
        run.max_new_tokens,
        precision.autocast_dtype(training_args.bf16, training_args.fp16),
    )
    model = on_device(load_saved_adapters(base, adapters), training_args.device)  # checked to fit `base` first
    if manifest is not None:
        evaluated = methods.get(taskdir.manifest_method(manifest)).evaluated(model, ilora_args)
    else:
        evaluated = {name: [name] for name in adapters}
    return {
        report: {name: r["accuracy"] for name, r in scorer.score(model, names).items()}
        for report, names in evaluated.items()
        if all(n in model.peft_config for n in names)
    }


def load_run_config(path: Path, overrides: dict | None = None):
    """`parse_run_config` with every registered method's options."""
    return parse_run_config(path, overrides, methods.argument_classes())
