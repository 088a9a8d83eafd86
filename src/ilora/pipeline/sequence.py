"""`ilora run`: a whole sequence, every task evaluated after each, in this order: settings and data
checked, base loaded and scored, each task trained (chained through its task directory, as two
`ilora train` commands would be) and scored, the summary and report written.

A run writes a run directory (see store.rundir) holding one task directory per task (see
store.taskdir). Re-running the same command skips every task whose directory is finished and
evaluated, provided the run's settings and inputs are unchanged; a task interrupted mid-way resumes
from its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ilora import methods
from ilora.config.arguments import START, TaskSpec
from ilora.config.parse import Settings, parse_run_config
from ilora.core.adapters import check_adapter_dir, check_target_modules
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import encode_rows
from ilora.data.formats import read_data
from ilora.errors import GateBreached
from ilora.evaluation import gate, general, report, results
from ilora.evaluation.scoring import Scorer, subsample, test_set_of
from ilora.files import read_json, write_json
from ilora.methods.base import evaluating
from ilora.pipeline.models import load_base, on_device, open_task
from ilora.pipeline.start import import_start, start_model, with_start
from ilora.pipeline.task import check_method, train
from ilora.runtime import distributed, policy, precision, sharding
from ilora.store import checkpoint, rundir, taskdir
from ilora.store.identity import base_model_identity
from ilora.store.paths import CHECKPOINT_MARKER, check_directory_target, check_trainer_outputs
from ilora.store.state import BUFFER_DIR, buffer_path

log = logging.getLogger(__name__)


def load_run_config(path: Path, overrides: dict | None = None) -> Settings:
    """A run config with every registered method's options, `overrides` applied over it."""
    return parse_run_config(path, overrides or {}, methods.argument_classes())


@dataclass
class Stage:
    """One training stage: a task (or every task, for joint training), where it is written, and which
    test sets are scored after it (with their row counts: what its eval.json must hold). An imported
    stage is an adapter trained elsewhere (`start_from`); one outside the matrix has no column or row."""

    number: int
    name: str
    tasks: list[TaskSpec]
    directory: Path
    scored: dict[str, int]
    imported: bool = False
    in_matrix: bool = True

    def done(self) -> bool:
        return taskdir.is_finished(self.directory) and (self.directory / rundir.EVAL_FILE).is_file()


@dataclass
class Plan:
    """A run, checked and ready: what every stage needs."""

    settings: Settings
    method: type
    root: Path
    run_dir: Path
    stages: list[Stage]
    train_rows: dict
    tokenizer: object
    scorer: Scorer
    reports: list[str]  # what evaluation reports: plastic, and stable for I-LoRA
    record: dict  # settings.json: what can change results, and the inputs by content
    config: dict  # every setting, as metrics.json records it
    identity: dict = field(default_factory=dict)  # the base model's


def run_sequence(settings: Settings) -> Path:
    """Train the tasks in order (or all at once for `joint`), evaluating every task after each."""
    started = time.time()
    method = check_method(settings, refuse_others=False)  # one config may serve several methods
    root, run_dir = _directories(settings)
    policy.check_sharding(settings.training, settings.model.quantization is not None, method)
    settings = with_start(settings, method.trains_jointly)
    train_rows, test_rows, general_text = _read_inputs(settings)  # every data error before anything loads
    if method.trains_jointly:
        settings = joint_settings(settings, [len(train_rows[t.name]) for t in settings.run.tasks])
    base, tokenizer = load_base(settings.model, settings.training)
    check_target_modules(base, settings.model.target_modules)
    plan = _plan(settings, method, root, run_dir, base, tokenizer, train_rows, test_rows, general_text)
    base_row, base_general = _score_base(plan, base) if distributed.rank() == 0 else (None, None)
    del base  # each task loads its own: holding this one (on rank 0's device) through training would double its memory
    distributed.barrier()
    evaluations = []
    for stage in plan.stages:
        if stage.done():
            log.info("task %d/%d %s: finished earlier, skipped", stage.number, len(plan.stages), stage.name)
            _score_what_is_due(plan, stage)  # a run extended by more tasks: their test sets, on this task's model
        else:
            _train_and_score(plan, stage)
        if distributed.rank() == 0 and stage.in_matrix:  # the other ranks train, then wait
            evaluations.append(_read_evaluation(plan, stage))
    if distributed.rank() == 0:
        _write_summary(plan, base_row, base_general, evaluations, time.time() - started)
    return run_dir


# ------------------------------------------------------------------ set-up
def _directories(settings: Settings) -> tuple[Path, Path]:
    root = Path(settings.training.output_dir)
    run_dir = root / settings.method
    check_directory_target(root, "output_dir")
    rundir.check_run_dir(run_dir)
    return root, run_dir


def _read_inputs(settings: Settings) -> tuple[dict, dict, str | None]:
    """Every task's train rows and (subsampled) test rows, and the general text."""
    run = settings.run
    train_rows = {t.name: read_data(t.train, t.dataset_dir, t.columns) for t in run.tasks}
    test_rows = {
        t.name: subsample(read_data(t.test, t.dataset_dir, t.columns).to_list(), run.eval_max_rows) for t in run.tasks
    }
    return train_rows, test_rows, general.read_text(run.general) if run.general else None


def joint_settings(settings: Settings, task_sizes: list[int]) -> Settings:
    """Joint training gets the sequence's optimizer steps, each on as many rows as a replay step
    (current + replay batch), so the upper bound sees as many rows as ER and I-LoRA do, not half."""
    training, continual = settings.training, settings.continual
    batch = training.per_device_train_batch_size
    rows_per_step = batch * distributed.world_size() * training.gradient_accumulation_steps
    if training.max_steps > 0:
        steps = training.max_steps * len(task_sizes)
    else:
        steps_per_epoch = sum(math.ceil(n / rows_per_step) for n in task_sizes)
        steps = math.ceil(training.num_train_epochs * steps_per_epoch)
    replay = (continual.replay_batch_size or batch) if continual.replay_budget()[0] > 0 else 0
    joint = dataclasses.replace(training, max_steps=steps, per_device_train_batch_size=batch + replay)
    return dataclasses.replace(settings, training=joint)


def scored_tasks(names: list[str], k: int, last: bool, eval_tasks: str) -> list[str]:
    """The tasks scored after training stage k (1-based); the last stage scores every task."""
    if eval_tasks == "all" or last:
        return list(names)
    return list(names[: k + 1])


def _stages(settings: Settings, method, run_dir: Path, rows: dict[str, int]) -> list[Stage]:
    run = settings.run
    groups = [run.tasks] if method.trains_jointly else [[t] for t in run.tasks]
    folders = rundir.stage_dir_names(settings.method, [t.name for t in run.tasks], method.trains_jointly)
    stages = []
    if run.start_from and not run.start_from_test:  # the model the sequence starts from, outside the matrix
        stages.append(Stage(0, START, [], run_dir / rundir.TASKS_DIR / f"0-{START}", {}, True, False))
    for k, (tasks, folder) in enumerate(zip(groups, folders), start=1):
        scored = scored_tasks(list(rows), k, k == len(groups), run.eval_tasks)
        name = settings.method if len(tasks) > 1 else tasks[0].name
        imported = bool(run.start_from) and name == START
        directory = run_dir / rundir.TASKS_DIR / folder
        stages.append(Stage(k, name, tasks, directory, {n: rows[n] for n in scored}, imported))
    return stages


def _plan(settings, method, root, run_dir, base, tokenizer, train_rows, test_rows, general_text) -> Plan:
    """Test sets built, the settings compared with the run's, saved state checked; settings.json written."""
    run, data = settings.run, settings.data
    tests = [test_set_of(t, test_rows[t.name], tokenizer, data.cutoff_len, data.use_chat_template) for t in run.tasks]
    identity = base_model_identity(base)
    config = rundir.config_record(settings)
    start = (run.start_from, run.start_from_data, run.start_from_test) if run.start_from else ()
    inputs = rundir.inputs_record(identity["fingerprint"], tokenizer, run.tasks, run.general, start)
    record = {**rundir.settings_record(config), "inputs": inputs}
    appended = rundir.check_same_settings(run_dir, record, extendable=not method.trains_jointly)
    if appended:
        log.info("the run is extended by %s: only those are trained", ", ".join(appended))
    stages = _stages(settings, method, run_dir, {t.name: len(t) for t in tests})
    reports = method.reports(settings.method_options)
    for stage in stages:  # damaged state is found now, not after hours of training
        _check_saved_stage(stage, reports, method.uses_replay(settings.continual))
    if distributed.rank() == 0:
        write_json(run_dir / rundir.SETTINGS_FILE, record)  # once model and test sets load: bad input leaves nothing
    scorer = Scorer(
        tokenizer,
        tests,
        run.eval_batch_size,
        run.max_new_tokens,
        precision.autocast_dtype(settings.training.bf16, settings.training.fp16),  # evaluation as trained
        settings.training.disable_tqdm,
        _general_windows(settings, tokenizer, general_text),
    )
    return Plan(
        settings, method, root, run_dir, stages, train_rows, tokenizer, scorer, reports, record, config, identity
    )


def _general_windows(settings: Settings, tokenizer, text: str | None) -> list[list[int]] | None:
    run = settings.run
    if text is None:
        return None
    return general.windows(text, tokenizer, settings.data.cutoff_len, run.general_windows, f"general: {run.general}")


def _check_saved_stage(stage: Stage, reports: list[str], replay: bool) -> None:
    """A finished task's manifest, adapters, buffer and evaluation, and an unfinished one's
    checkpoints, read now: a damaged file is one line naming it before any training starts."""
    task_dir = stage.directory
    if taskdir.is_finished(task_dir):
        manifest = taskdir.read_manifest(task_dir)
        for path in taskdir.saved_adapters(task_dir, manifest).values():
            check_adapter_dir(path, manifest["lora"])
        if replay:
            ReplayBuffer.load(buffer_path(task_dir / BUFFER_DIR))
        if (task_dir / rundir.EVAL_FILE).exists():
            rundir.read_eval(task_dir / rundir.EVAL_FILE, reports, stage.scored, partial=True)
    elif task_dir.is_dir():
        check_trainer_outputs(task_dir)
        last = checkpoint.last_complete_checkpoint(task_dir)
        if last is not None:
            read_json(last / CHECKPOINT_MARKER, "checkpoint marker")


# ----------------------------------------------------------------- the base
def _score_base(plan: Plan, base) -> tuple[dict, float | None]:
    """Row 0 of the accuracy matrix and the base's general perplexity, scored where the tasks will be
    (the Trainer's device). Shared by every method run from one config, so cached beside the runs. A run
    that starts from an adapter outside the matrix starts from base + that adapter: row 0 is its."""
    run = plan.settings.run
    if run.start_from and not run.start_from_test:
        base = start_model(plan.settings, base)
    base = on_device(base, plan.settings.training.device)
    data, inputs = plan.settings.data, plan.record["inputs"]
    key = {
        "model": plan.identity,
        "start_from": inputs["start_from"] if run.start_from and not run.start_from_test else None,
        "tasks": [dataclasses.asdict(t) for t in run.tasks],
        "test_files": inputs["test"],
        "cutoff_len": data.cutoff_len,
        "use_chat_template": data.use_chat_template,
    }
    path = plan.root / rundir.BASE_EVAL_FILE
    scores = rundir.read_base_eval(path, key, {t.name: len(t) for t in plan.scorer.tests})
    if scores is None:
        scores = plan.scorer.score(base, label="base")
        write_json(path, {"key": key, "scores": scores})
    return scores, _base_general(plan, base)


def _base_general(plan: Plan, base) -> float | None:
    windows = plan.scorer.windows
    if windows is None:
        return None
    inputs, run = plan.record["inputs"], plan.settings.run
    key = {
        "model": plan.identity,
        "start_from": inputs["start_from"] if run.start_from and not run.start_from_test else None,
        "general": inputs["general"],
        "windows": len(windows),
        "cutoff_len": plan.settings.data.cutoff_len,
    }
    path = plan.root / rundir.GENERAL_BASE_FILE
    cached = rundir.read_general_base(path, key)
    if cached is not None:
        return cached
    value = plan.scorer.perplexity(base)
    write_json(path, {"key": key, "perplexity": value})
    return value


# ---------------------------------------------------------------- the stages
def _train_and_score(plan: Plan, stage: Stage) -> None:
    """Train the stage unless its task directory is finished; rank 0 then scores the test sets due."""
    began = time.time()
    model = None
    if taskdir.is_finished(stage.directory):  # trained, but the evaluation was interrupted
        train_seconds = taskdir.read_manifest(stage.directory).get("train_seconds") or 0.0
    elif stage.imported:
        import_start(plan.settings, stage.directory, plan.tokenizer)
        train_seconds = 0.0
    else:
        trainer = _train_stage(plan, stage)
        train_seconds = time.time() - began
        trainer.save_task(stage.directory)
        # a sharded model cannot be scored by rank 0 alone: it is scored whole, read back from the task
        model = None if sharding.is_sharded(trainer.model) else trainer.model
        del trainer
    if distributed.rank() == 0:
        eval_began = time.time()
        record = {"scores": {name: {} for name in plan.reports}}  # outside the matrix: nothing to score
        if stage.in_matrix:
            record = _score_stage(plan, model or _opened(plan, stage), list(stage.scored))
        record["timings"] = {"train_seconds": train_seconds, "eval_seconds": time.time() - eval_began}
        write_json(stage.directory / rundir.EVAL_FILE, record)
    distributed.barrier()


def _opened(plan: Plan, stage: Stage):
    """The stage's task read back whole (trained sharded, or imported), on the training device."""
    model_args, training = plan.settings.model, plan.settings.training
    return open_task(
        stage.directory, model_args.model_name_or_path, model_args.trust_remote_code, training.device
    ).model


def _score_what_is_due(plan: Plan, stage: Stage) -> None:
    """A finished task scored before tasks were appended to the run lacks the new tasks' test sets (the
    next task's, every task's after the last): rank 0 scores those on the saved task and adds them."""
    if distributed.rank() == 0:
        path = stage.directory / rundir.EVAL_FILE
        saved = rundir.read_eval(path, plan.reports, stage.scored, partial=True)
        missing = [t for t in stage.scored if any(t not in saved["scores"][r] for r in plan.reports)]
        if missing:
            for name, scores in _score_stage(plan, _opened(plan, stage), missing, general=False)["scores"].items():
                saved["scores"][name].update(scores)
            write_json(path, saved)
    distributed.barrier()


def _train_stage(plan: Plan, stage: Stage):
    """The stage's rows encoded and trained, chained to the previous stage's task directory."""
    settings = plan.settings
    parts = [plan.train_rows[task.name] for task in stage.tasks]
    rows = parts[0] if len(parts) == 1 else _concatenated(parts)
    examples = encode_rows(
        rows, plan.tokenizer, settings.data.cutoff_len, settings.data.use_chat_template, f"task {stage.name}"
    )
    index = plan.stages.index(stage)
    previous = plan.stages[index - 1] if index else None
    continual = dataclasses.replace(
        settings.continual,
        previous_task_model=str(previous.directory) if previous else None,
        prev_task_id=previous.name if previous else None,
        current_task_id=stage.name,
    )
    last = checkpoint.last_complete_checkpoint(stage.directory)  # a crash mid-task: continue from there
    if last is not None:
        log.info("task %d %s: resuming from %s", stage.number, stage.name, last)
    # the run owns its task directories: leftovers of an interrupted write may be replaced
    taskdir.planned_outputs(str(stage.directory), plan.method, continual, settings.method_options, overwrite=True)
    training = dataclasses.replace(
        settings.training, output_dir=str(stage.directory), resume_from_checkpoint=str(last) if last else None
    )
    base, _ = load_base(settings.model, settings.training)
    return train(base, plan.tokenizer, examples, dataclasses.replace(settings, continual=continual, training=training))


def _concatenated(parts: list):
    """Every task's training rows, for joint training."""
    import datasets

    return datasets.concatenate_datasets(parts)


def _score_stage(plan: Plan, model, scored: list[str], general: bool = True) -> dict:
    """Each evaluated model's scores on the test sets due, and (`general`) its general perplexity."""
    options = plan.settings.method_options
    general = general and plan.scorer.windows is not None
    record: dict = {"scores": {}, **({"general": {}} if general else {})}
    for name in plan.reports:
        with evaluating(plan.method, model, name, options):
            record["scores"][name] = plan.scorer.score(model, scored, label=name)
            if general:
                record["general"][name] = plan.scorer.perplexity(model)
    return record


def _read_evaluation(plan: Plan, stage: Stage) -> dict:
    saved = rundir.read_eval(
        stage.directory / rundir.EVAL_FILE, plan.reports, stage.scored, general=plan.scorer.windows is not None
    )
    log.info(_summary_line(stage, len(plan.stages), saved, plan.reports))
    return saved


def _summary_line(stage: Stage, count: int, saved: dict, reports: list[str]) -> str:
    parts = []
    for name in reports:
        accuracies = " ".join(f"{n}={saved['scores'][name][n]['accuracy']:.3f}" for n in stage.scored)
        parts.append(f"{name}: {accuracies}")
    seconds = saved["timings"]
    return (
        f"task {stage.number}/{count} {stage.name}: train {seconds['train_seconds']:.0f}s, "
        f"eval {seconds['eval_seconds']:.0f}s | " + " | ".join(parts)
    )


# ------------------------------------------------------------------ the end
def _write_summary(plan: Plan, base_row, base_general, evaluations: list[dict], seconds: float) -> None:
    """metrics.json and report.md."""
    settings, method = plan.settings, plan.method
    timings = [e["timings"] for e in evaluations]
    tests = plan.scorer.tests
    summary = results.summary(
        settings.method,
        settings.run,
        plan.reports,
        base_row,
        evaluations,
        timings,
        seconds,
        tests,
        method.trains_jointly,
    )
    if plan.scorer.windows is not None:
        summary["general"] = results.general_summary(
            settings.run, plan.scorer.windows, base_general, evaluations, plan.reports
        )
    summary["config"] = plan.config
    summary["hardware"] = precision.run_record(settings.training)
    summary["inputs"] = plan.record["inputs"]  # lets `ilora compare` refuse runs scored on other test files
    run = settings.run
    if run.gate_general_ppl is not None or run.gate_task_drop is not None:
        summary["gate"] = gate.check(summary, run.gate_general_ppl, run.gate_task_drop)
    write_json(plan.run_dir / rundir.METRICS_FILE, summary)
    report.write_report(plan.run_dir, summary)
    if summary.get("gate", {}).get("breaches"):
        breaches = summary["gate"]["breaches"]
        raise GateBreached(f"forgetting gate breached ({'; '.join(breaches)}); the run is written to {plan.run_dir}")
