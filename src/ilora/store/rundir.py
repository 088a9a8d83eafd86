"""What a run directory (`ilora run`) holds besides its task directories, and when it may be continued.

    <output_dir>/base_eval.json            the untrained model's scores, shared by the methods of a config
    <output_dir>/<method>/settings.json    the settings and the inputs' digests the run was started with
    <output_dir>/<method>/tasks/<k>-<name>/eval.json   every test set scored after task k
    <output_dir>/<method>/metrics.json     the summary (report.md and the plots are drawn from it)

Finished tasks are skipped when a run is re-run, so a run continues only under the settings and on
the very inputs (model weights, every train and test file) it was started with: otherwise its
accuracy matrix would mix two experiments, or report scores of data that is no longer there. A run
that never trained anything may be restarted under new settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ilora.errors import ILoRAError
from ilora.files import file_digest, finite_number, read_json
from ilora.store import taskdir
from ilora.store.checkpoint import last_complete_checkpoint
from ilora.store.identity import tokenizer_digest

SETTINGS_FILE = "settings.json"
EVAL_FILE = "eval.json"
BASE_EVAL_FILE = "base_eval.json"
GENERAL_BASE_FILE = "general_base.json"  # the base model's perplexity on a run's general text
METRICS_FILE = "metrics.json"
TASKS_DIR = "tasks"


def inputs_record(model_fingerprint: str, tokenizer, tasks, general: str | None = None, start=()) -> dict[str, Any]:
    """The run's inputs by content: a changed file at the same path is a changed input. `start`: the
    adapter a run starts from and the files of its task (`start_from`, `start_from_data`, `start_from_test`)."""
    from ilora.data.formats import source_files

    def digest(spec: str, dataset_dir: str | None = None) -> str:
        files = source_files(spec, dataset_dir)
        return (
            file_digest(files[0])
            if len(files) == 1
            else hashlib.sha256("".join(map(file_digest, files)).encode()).hexdigest()
        )

    return {
        "model": model_fingerprint,
        "tokenizer": tokenizer_digest(tokenizer),
        "train": {t.name: digest(t.train, t.dataset_dir) for t in tasks},
        "test": {t.name: digest(t.test, t.dataset_dir) for t in tasks},
        "general": file_digest(general) if general else None,
        "start_from": [digest(path) if path else None for path in start] or None,
    }


def stage_dir_names(method: str, tasks: list[str], joint: bool) -> list[str]:
    """The folders under tasks/, in training order: `<k>-<task>`, or one `1-<method>` for joint training."""
    if joint and len(tasks) > 1:
        return [f"1-{method}"]
    return [f"{k}-{name}" for k, name in enumerate(tasks, start=1)]


# ------------------------------------------------------------ continuing a run
def check_run_dir(run_dir: Path) -> None:
    """A run writes into `run_dir` only if it is new, empty, or an ilora run directory."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ILoRAError(f"run directory {run_dir} is a file")
    names = {p.name for p in run_dir.iterdir()}
    if names and not names & {SETTINGS_FILE, TASKS_DIR}:
        raise ILoRAError(
            f"{run_dir} already exists and is not an ilora run directory; ilora writes nothing "
            "into it: choose another output_dir"
        )


def has_trained(run_dir: Path) -> bool:
    """A finished task, or a complete checkpoint of one, exists: the run is under way."""
    tasks = run_dir / TASKS_DIR
    if not tasks.is_dir():
        return False
    return any(taskdir.is_finished(d) or last_complete_checkpoint(d) for d in tasks.iterdir() if d.is_dir())


def check_same_settings(run_dir: Path, record: dict, extendable: bool = True) -> list[str]:
    """Refuse to continue a run that has trained under other settings or on other inputs. A run may be
    extended: its config may list more tasks after the ones it was started with (not for joint training,
    `extendable` False), which are returned."""
    path = run_dir / SETTINGS_FILE
    if not path.is_file() or not has_trained(run_dir):
        return []  # nothing trained yet: a failed start does not block the corrected retry
    stored = read_json(path, "run settings")
    if not isinstance(stored, dict):
        raise ILoRAError(f"{path}: damaged run settings (not a JSON object); delete {run_dir} to start again")
    appended = _appended_tasks(stored.get("run"), record["run"]) if extendable else []
    changed_input = _changed_input(stored.get("inputs"), record["inputs"], appended)
    if changed_input:
        raise ILoRAError(
            f"{changed_input} changed since {run_dir} was started: its results would not match "
            "the data; use another output_dir or delete that directory to start again"
        )
    changed = []
    for part, values in record.items():
        before = stored.get(part) if isinstance(stored.get(part), dict) else {}
        if part == "run" and appended:  # the tasks it was started with come first: an extension
            before = {**before, "tasks": values["tasks"]}
        if part != "inputs":
            changed += [
                f"{key}: {before.get(key)!r} -> {values.get(key)!r}"
                for key in sorted(values.keys() | before.keys())
                if before.get(key) != values.get(key)
            ]
    if changed:
        listed = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ILoRAError(
            f"{run_dir} was started with other settings ({listed}); "
            "use another output_dir or delete that directory to start again"
        )
    return appended


def _appended_tasks(stored_run: Any, run: dict) -> list[str]:
    """The names of the tasks `run` lists after every task of `stored_run`, which it lists first, as it was."""
    before = stored_run.get("tasks") if isinstance(stored_run, dict) else None
    now = run["tasks"]
    if not isinstance(before, list) or len(now) <= len(before) or now[: len(before)] != before:
        return []
    return [task["name"] for task in now[len(before) :]]


def _changed_input(stored: Any, current: dict, appended: list[str] = ()) -> str | None:
    if not isinstance(stored, dict):
        return "the record of its inputs (settings.json has none)"
    if stored.get("model") != current["model"]:
        return "the base model's weights"
    if stored.get("tokenizer") != current["tokenizer"]:
        return "the model's tokenizer"
    for kind in ("train", "test"):
        for task, digest in current[kind].items():
            if task not in appended and (stored.get(kind) or {}).get(task) != digest:
                return f"the {kind} file of task {task!r}"
    if stored.get("general") != current.get("general"):
        return "the general text"
    if stored.get("start_from") != current.get("start_from"):
        return "start_from (the adapter the run starts from, or its data)"
    return None


# ------------------------------------------------------------- evaluation files
def read_eval(
    path: Path, adapters: list[str], test_rows: dict[str, int], general: bool = False, partial: bool = False
) -> dict:
    """A task's `eval.json`, checked against the run: every adapter, every task, every row, finite
    (and, with `general`, each adapter's perplexity on the general text). `partial`: the tasks it lacks are
    not damage (scored before tasks were appended to the run, they are scored now)."""
    saved = read_json(path, "evaluation file")
    scores = saved.get("scores") if isinstance(saved, dict) else None
    timings = saved.get("timings") if isinstance(saved, dict) else None
    if not isinstance(scores, dict) or not isinstance(timings, dict):
        raise _damaged(path, "no 'scores' and 'timings'")
    for key in ("train_seconds", "eval_seconds"):
        if not finite_number(timings.get(key)):
            raise _damaged(path, f"timing '{key}' is {timings.get(key)!r}")
    for adapter in adapters:
        scored = scores.get(adapter)
        due = {t: n for t, n in test_rows.items() if t in scored} if partial and isinstance(scored, dict) else test_rows
        check_scores(path, scored, due, adapter)
        if general:
            value = (saved.get("general") or {}).get(adapter)
            if not finite_number(value) or value < 1.0:
                raise _damaged(path, f"general perplexity of {adapter} is {value!r}")
    return saved


def read_general_base(path: Path, key: dict) -> float | None:
    """The base model's cached general perplexity, or None when computed for other inputs."""
    if not path.exists():
        return None
    cached = read_json(path, "base-model general perplexity")
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    if not finite_number(cached.get("perplexity")):
        raise _damaged(path, f"perplexity is {cached.get('perplexity')!r}")
    return cached["perplexity"]


def check_scores(path: Path, scores: Any, test_rows: dict[str, int], label: str) -> None:
    if not isinstance(scores, dict):
        raise _damaged(path, f"no scores for {label}")
    for task, rows in test_rows.items():
        entry = scores.get(task)
        if not isinstance(entry, dict):
            raise _damaged(path, f"no score of {label} on task {task!r}")
        accuracy, predictions = entry.get("accuracy"), entry.get("predictions")
        if not finite_number(accuracy) or not 0.0 <= accuracy <= 1.0:
            raise _damaged(path, f"accuracy of {label} on task {task!r} is {accuracy!r}")
        if not isinstance(predictions, list) or len(predictions) != rows:
            count = len(predictions) if isinstance(predictions, list) else predictions
            raise _damaged(path, f"{count} predictions of {label} on task {task!r}, the test set has {rows} rows")


def read_base_eval(path: Path, key: dict, test_rows: dict[str, int]) -> dict | None:
    """The cached scores of the untrained model, or None when they were computed for other inputs."""
    if not path.exists():
        return None
    cached = read_json(path, "base-model evaluation")
    if not isinstance(cached, dict) or "key" not in cached:
        raise _damaged(path, "no 'key'")
    if cached["key"] != key:
        return None
    check_scores(path, cached.get("scores"), test_rows, "the base model")
    return cached["scores"]


def _damaged(path: Path, what: str) -> ILoRAError:
    return ILoRAError(f"{path}: damaged ({what}); delete it and run again to recompute it")


# ------------------------------------------------------- records and summary
# The fields of a run's config record that cannot change its results: where files go, logging and
# progress, how often checkpoints are written (a resume is bitwise), process plumbing, and the paths
# of inputs that `inputs_record` records by content (a run directory moved with its files continues;
# a file changed at the same path does not). Every other field is guarded, including any field added
# later: finished tasks are skipped, so reusing them under a changed setting would silently mix two
# experiments in one accuracy matrix. tests/test_reliability.py fails on an unreviewed new field.
NOT_RESULTS: dict[str, frozenset[str]] = {
    "model": frozenset({"model_name_or_path"}),
    "data": frozenset({"dataset", "dataset_dir", "overwrite_output_dir"}),
    "continual": frozenset(),
    "method_options": frozenset(),
    # a gate judges results and changes none; start_from's files are recorded by content (inputs_record)
    "run": frozenset(
        {"general", "gate_general_ppl", "gate_task_drop", "start_from", "start_from_data", "start_from_test"}
    ),
    "task": frozenset({"train", "test", "dataset_dir"}),
    "training": frozenset(
        {
            "output_dir",
            "run_name",
            "project",
            "report_to",
            "disable_tqdm",
            "log_level",
            "log_level_replica",
            "log_on_each_node",
            "logging_strategy",
            "logging_steps",
            "logging_first_step",
            "logging_nan_inf_filter",
            "include_num_input_tokens_seen",
            "skip_memory_metrics",
            "debug",
            "trackio_space_id",
            "trackio_bucket_id",
            "trackio_static_space_id",
            "push_to_hub",
            "hub_token",
            "hub_private_repo",
            "hub_model_id",
            "hub_strategy",
            "hub_always_push",
            "hub_revision",
            "save_strategy",
            "save_steps",
            "save_total_limit",
            "save_on_each_node",
            "enable_jit_checkpoint",
            "resume_from_checkpoint",
            "do_train",
            "do_eval",
            "do_predict",
            "eval_strategy",
            "eval_steps",
            "eval_delay",
            "eval_on_start",
            "per_device_eval_batch_size",
            "prediction_loss_only",
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "eval_accumulation_steps",
            "include_for_metrics",
            "batch_eval_metrics",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
            "dataloader_prefetch_factor",
            "dataloader_multiprocessing_context",
            "torch_empty_cache_steps",
            "ddp_timeout",
            "ddp_backend",
            "ddp_bucket_cap_mb",
            "ddp_find_unused_parameters",
            "ddp_broadcast_buffers",
            "ddp_static_graph",
            "local_rank",
        }
    ),
}


def _guarded(part: str, values: dict) -> dict:
    return {key: value for key, value in values.items() if key not in NOT_RESULTS[part]}


def settings_record(config: dict) -> dict:
    """The part of the run's config record (`config_record`) that can change its results: every field
    but those of `NOT_RESULTS`."""
    run = _guarded("run", config["run"])
    run["tasks"] = [_guarded("task", task) for task in config["run"]["tasks"]]
    record = {
        part: _guarded(part, config[part] or {})
        for part in ("model", "data", "continual", "method_options", "training")
    }
    record["run"] = run
    return json.loads(json.dumps(record))  # as it reads back from the file


def config_record(settings) -> dict:
    """Every setting of a run (config.parse.Settings), as metrics.json records it."""
    options = settings.method_options
    return {
        "model": dataclasses.asdict(settings.model),
        "data": dataclasses.asdict(settings.data),
        "continual": dataclasses.asdict(settings.continual),
        "method_options": dataclasses.asdict(options) if options is not None else None,
        "training": {k: v for k, v in settings.training.to_dict().items() if not k.startswith("_")},
        "run": dataclasses.asdict(settings.run),
    }
