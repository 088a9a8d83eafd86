"""Nothing lost, nothing silent: every refusal is one line naming the culprit, with its exit code, no
traceback, and nothing of the user's changed or deleted (the whole tree is snapshotted before and
after). One table per class of mistake; a case builds its argv from a shared world and may first
damage a copy of something in its own folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import first_task
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model, sentiment_rows, tiny_tokenizer, two_task_config, write_jsonl

from ilora.cli import main
from ilora.errors import ILoRAError

TRAIN = [
    "--lora_target",
    "q_proj,v_proj",
    "--lora_rank",
    "4",
    "--max_steps",
    "2",
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--disable_tqdm",
    "true",
    "--ilora_buffer_size",
    "4",
    "--save_strategy",
    "no",
]
BAD_INPUT, DIVERGED = 2, 1
# Plain SGD at 1e12 without clipping, in fp32: weights reach ~1e25 by step 2 and NaN at step 3 on the tiny
# model. (Pinned to fp32: under bf16 autocast the same run saturates at finite ~1e18 weights and logits.)
HUGE_STEP = ["--optim", "sgd", "--learning_rate", "1e12", "--max_grad_norm", "0", "--max_steps", "3", "--bf16", "false"]
HUGE_RUN = {"optim": "sgd", "learning_rate": 1e12, "max_grad_norm": 0, "max_steps": 3, "bf16": False}


# ------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """Model, data, a finished task `t1`, a finished two-task run, and a folder of the user's."""
    root = tmp_path_factory.mktemp("world")
    data, _ = first_task(root, tiny_model_dir, TRAIN)
    thesis = root / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.txt").write_text("two years of work")
    run = root / "run"
    save_tiny_model(run / "model")
    settings = two_task_config(run, Path("model"), max_steps=2, save_strategy="no", output_dir="out")
    for task in settings["tasks"]:
        task["test"] = f"{task['name']}.test.jsonl"
        shutil.copy(run / task["train"], run / task["test"])
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    assert main(["run", str(run / "config.yaml"), "--method", "ilora"]) == 0
    return {"root": root, "model": tiny_model_dir, "data": data, "t1": root / "t1", "thesis": thesis, "run": run}


def train(w, t, *extra, out=None, data=None):
    return [
        "train",
        "--model",
        str(w["model"]),
        "--dataset",
        str(data or w["data"]),
        "--output_dir",
        str(out or t / "out"),
        *TRAIN,
        *extra,
    ]


def chained(w, t, *extra, out=None):
    return train(w, t, "--previous_task_model", str(w["t1"]), *extra, out=out)


def copy_of(w, t, key: str) -> Path:
    target = t / key
    shutil.copytree(w[key], target)
    return target


def task_copy(w, t) -> Path:
    return copy_of(w, t, "t1")


def run_copy(w, t, change=None) -> list[str]:
    """A copy of the finished run (config, model, data, results); `change` edits the config."""
    run = copy_of(w, t, "run")
    if change:
        settings = yaml.safe_load((run / "config.yaml").read_text())
        change(settings)
        (run / "config.yaml").write_text(yaml.safe_dump(settings))
    return ["run", str(run / "config.yaml"), "--method", "ilora"]


def run_copy_then(damage):
    """A builder: copy the finished run, then `damage(copy's folder)`."""

    def build(w, t):
        argv = run_copy(w, t)
        damage(t / "run")
        return argv

    return build


def run_config(w, t, change=None, text: str | None = None) -> list[str]:
    """A fresh one-task run config in the case's folder (nothing trained yet)."""
    path = t / "run.yaml"
    if text is None:
        write_jsonl(t / "a.test.jsonl", [{"prompt": "x", "response": "positive"}])
        settings = {
            "model_name_or_path": str(w["model"]),
            "output_dir": "out",
            "lora_target": "q_proj",
            "max_steps": 1,
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            "save_strategy": "no",
            "tasks": [
                {"name": "a", "train": str(w["data"]), "test": "a.test.jsonl", "choices": ["positive", "negative"]}
            ],
        }
        if change:
            change(settings)
        text = yaml.safe_dump(settings)
    path.write_text(text)
    return ["run", str(path)]


def yaml_train(w, t, text: str) -> list[str]:
    path = t / "train.yaml"
    path.write_text(f"model: {w['model']}\ndataset: {w['data']}\noutput_dir: {t / 'out'}\n" + text)
    return ["train", str(path)]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def poison(adapter_dir: Path) -> None:
    """One NaN in an adapter's weights."""
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(weights))


def edit_adapter(adapter_dir: Path, change) -> None:
    """`change(tensors)` on an adapter's weights, saved back."""
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))


def inject_head(tensors: dict) -> None:
    tensors["base_model.model.lm_head.weight"] = torch.zeros(300, 32)


def misshape(tensors: dict) -> None:
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)


def drop_one(tensors: dict) -> None:
    del tensors[sorted(k for k in tensors if "lora_B" in k)[0]]


def integers(tensors: dict) -> None:
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)


def with_adapter(change, adapter: str = "plastic"):
    """A copy of t1 whose `adapter` was changed by `change(tensors)`; returns the copy."""

    def build(w, t):
        copy = task_copy(w, t)
        edit_adapter(copy / adapter, change)
        return copy

    return build


def checkpoint_with(change):
    """A task stopped after its checkpoint-1, whose plastic adapter `change` edited; resumed."""

    def build(w, t):
        argv = train(w, t, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "1")
        assert main(argv) == 0
        (t / "out" / "ilora_task.json").unlink()
        checkpoint = t / "out" / "checkpoint-1"
        adapter = next(p for p in [checkpoint, *checkpoint.iterdir()] if (p / "adapter_model.safetensors").is_file())
        edit_adapter(adapter, change)
        return train(
            w,
            t,
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--max_steps",
            "2",
            "--resume_from_checkpoint",
            str(checkpoint),
            "--overwrite_output_dir",
            "true",
        )

    return build


def other_tokenizer_model(t: Path) -> Path:
    """The tiny model's weights beside another chat template: the same base, another tokenizer."""
    model = t / "model-other-tokenizer"
    save_tiny_model(model)
    tiny_tokenizer(chat_template=True).save_pretrained(model)
    return model


IDENTITY = {
    "chain a task on the same base with another tokenizer": (
        lambda w, t: [
            "train",
            "--model",
            str(other_tokenizer_model(t)),
            "--dataset",
            str(w["data"]),
            "--output_dir",
            str(t / "out"),
            *TRAIN,
            "--previous_task_model",
            str(w["t1"]),
        ],
        BAD_INPUT,
        "was trained with another tokenizer",
    ),
    "eval with another tokenizer": (
        lambda w, t: [
            "eval",
            "--model",
            str(other_tokenizer_model(t)),
            "--adapter",
            str(w["run"] / "out" / "ilora" / "tasks" / "1-alpha"),
            "--tasks",
            str(w["run"] / "config.yaml"),
        ],
        BAD_INPUT,
        "was trained with another tokenizer",
    ),
    "export with another tokenizer": (
        lambda w, t: [
            "export",
            str(w["run"] / "out" / "ilora" / "tasks" / "1-alpha"),
            "--output",
            str(t / "x"),
            "--model",
            str(other_tokenizer_model(t)),
        ],
        BAD_INPUT,
        "was trained with another tokenizer",
    ),
    "export on another base": (
        lambda w, t: [
            "export",
            str(w["run"] / "out" / "ilora" / "tasks" / "1-alpha"),
            "--output",
            str(t / "x"),
            "--model",
            str(save_tiny_model(t / "other", seed=9)),
        ],
        BAD_INPUT,
        "holds other weights",
    ),
    "resume after the LoRA rank changed": (
        lambda w, t: then(
            lambda: (
                main(train(w, t, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "1")) == 0
                and (t / "out" / "ilora_task.json").unlink()
            ),
            train(
                w,
                t,
                "--lora_rank",
                "2",
                "--resume_from_checkpoint",
                str(t / "out" / "checkpoint-1"),
                "--overwrite_output_dir",
                "true",
            ),
        ),
        BAD_INPUT,
        "does not match",
    ),
}


ADAPTER_FILES = {
    "chained on an adapter carrying lm_head.weight": (
        lambda w, t: train(w, t, "--previous_task_model", str(with_adapter(inject_head)(w, t))),
        BAD_INPUT,
        "tensor base_model.model.lm_head.weight is not part of a LoRA adapter",
    ),
    "eval of an adapter carrying lm_head.weight": (
        lambda w, t: [
            "eval",
            "--model",
            str(w["model"]),
            "--adapter",
            str(with_adapter(inject_head)(w, t)),
            "--tasks",
            str(w["run"] / "config.yaml"),
        ],
        BAD_INPUT,
        "is not part of a LoRA adapter",
    ),
    "export --merge of an adapter carrying lm_head.weight": (
        lambda w, t: [
            "export",
            str(with_adapter(inject_head, "stable")(w, t)),
            "--output",
            str(t / "merged"),
            "--merge",
        ],
        BAD_INPUT,
        "lm_head.weight is not part of a LoRA adapter",
    ),
    "chained on a misshapen LoRA tensor": (
        lambda w, t: train(w, t, "--previous_task_model", str(with_adapter(misshape, "stable")(w, t))),
        BAD_INPUT,
        "does not fit this model",
    ),
    "chained on an adapter missing a tensor": (
        lambda w, t: train(w, t, "--previous_task_model", str(with_adapter(drop_one)(w, t))),
        BAD_INPUT,
        "is missing (1 missing)",
    ),
    "export of integer adapter weights": (
        lambda w, t: [
            "export",
            str(with_adapter(integers)(w, t)),
            "--output",
            str(t / "clean"),
            "--adapter",
            "plastic",
        ],
        BAD_INPUT,
        "not floating-point weights",
    ),
    "resume from a checkpoint whose adapter carries lm_head.weight": (
        checkpoint_with(inject_head),
        BAD_INPUT,
        "is not part of a LoRA adapter",
    ),
}


def edit_buffer(task: Path, tensors=None, state=None) -> None:
    if tensors:
        path = task / "buffer" / "buffer.safetensors"
        saved = load_file(str(path))
        tensors(saved)
        save_file(saved, str(path))
    if state:
        edit_json(task / "buffer" / "buffer.json", state)


def model_with(t: Path, tokenizer_change=None, config_change=None, template: str | None = None) -> Path:
    """A copy of the tiny model with its tokenizer or config edited (as JSON), or another chat template."""
    model = save_tiny_model(t / "odd-model")
    if template is not None:
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = template
        tokenizer.save_pretrained(model)
    if tokenizer_change:
        edit_json(model / "tokenizer_config.json", tokenizer_change)
    if config_change:
        edit_json(model / "config.json", config_change)
    return model


RAISES_ON_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)


def stray_folder_in_tasks(w, t) -> Path:
    run = copy_of(w, t, "run") / "out" / "ilora"
    (run / "tasks" / "9-notes").mkdir()
    (run / "tasks" / "9-notes" / "todo.txt").write_text("mine")
    return run


DAMAGED_STATE = {
    "buffer token ids beyond the vocabulary": (
        lambda w, t: (
            chained(w, t, "--ilora_buffer_size", "4")
            if False
            else train(
                w,
                t,
                "--previous_task_model",
                str(
                    then(
                        lambda: edit_buffer(t / "t1", tensors=lambda d: d.update(input_ids=d["input_ids"] + 1000)),
                        task_copy(w, t),
                    )
                ),
            )
        ),
        BAD_INPUT,
        "beyond this model's vocabulary",
    ),
    "a garbage RNG state in buffer.json": (
        lambda w, t: train(
            w,
            t,
            "--previous_task_model",
            str(
                then(
                    lambda: edit_buffer(t / "t1", state=lambda d: d.update(rng_state=[3, [7] * 10, None])),
                    task_copy(w, t),
                )
            ),
        ),
        BAD_INPUT,
        "is not a saved random state",
    ),
    "float token ids in the buffer": (
        lambda w, t: train(
            w,
            t,
            "--previous_task_model",
            str(
                then(
                    lambda: edit_buffer(t / "t1", tensors=lambda d: d.update(input_ids=d["input_ids"].float())),
                    task_copy(w, t),
                )
            ),
        ),
        BAD_INPUT,
        "holds float32 token ids in 'input_ids'",
    ),
    "a chat template that raises on a system turn": (
        lambda w, t: train(
            w,
            t,
            "--model",
            str(model_with(t, template=RAISES_ON_SYSTEM)),
            data=write_jsonl(t / "sys.jsonl", [{**r, "system": "be brief"} for r in sentiment_rows(4)]),
        ),
        BAD_INPUT,
        "sys.jsonl row 1: the tokenizer's chat template fails on this conversation (TemplateError: no system turns)",
    ),
    "a chat template that does not parse": (
        lambda w, t: train(w, t, "--model", str(model_with(t, template="{% for m in messages %}{{ m"))),
        BAD_INPUT,
        "chat template",
    ),
    "an unknown model_type": (
        lambda w, t: train(w, t, "--model", str(model_with(t, config_change=lambda c: c.update(model_type="llamma")))),
        BAD_INPUT,
        "model_type 'llamma' in config.json is not an architecture",
    ),
    "a tokenizer that needs remote code, via eval": (
        lambda w, t: [
            "eval",
            "--model",
            str(
                model_with(
                    t,
                    lambda c: c.update(
                        tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["tok.MyTokenizer", None]}
                    ),
                )
            ),
            "--adapter",
            str(w["run"] / "out" / "ilora" / "tasks" / "1-alpha"),
            "--tasks",
            str(w["run"] / "config.yaml"),
        ],
        BAD_INPUT,
        "its tokenizer is custom code",
    ),
    "compare: metrics.json without timings": (
        lambda w, t: [
            "compare",
            str(w["run"] / "out" / "ilora"),
            str(
                then(
                    lambda: edit_json(t / "run/out/ilora/metrics.json", lambda m: m.pop("timings")),
                    copy_of(w, t, "run") / "out" / "ilora",
                )
            ),
        ],
        BAD_INPUT,
        "metrics.json: damaged (no timings (total_seconds))",
    ),
    "compare: a list where a number belongs": (
        lambda w, t: [
            "compare",
            str(w["run"] / "out" / "ilora"),
            str(
                then(
                    lambda: edit_json(
                        t / "run/out/ilora/metrics.json", lambda m: m["timings"].update(total_seconds=[1, 2])
                    ),
                    copy_of(w, t, "run") / "out" / "ilora",
                )
            ),
        ],
        BAD_INPUT,
        "metrics.json: damaged (no timings",
    ),
    "YAML nested 5,000 deep": (
        lambda w, t: yaml_train(w, t, "deep: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"),
        BAD_INPUT,
        "nested too deeply",
    ),
}


def checkpoint_marker(w, folder: Path) -> None:
    """A complete checkpoint's marker, as ilora writes it, for t1's base and LoRA settings."""
    manifest = json.loads((w["t1"] / "ilora_task.json").read_text())
    marker = {
        "format_version": 2,
        "sequence_steps": 1,
        "task_id": None,
        "method_state": {},
        "task_loss": {"sum": 1.0, "micro_batches": 1},
        "base_model": manifest["base_model"],
        "lora": manifest["lora"],
    }
    (folder / "ilora_checkpoint.json").write_text(json.dumps(marker))


def then(action, result):
    """Run `action` (it prepares the case's folder), then return `result` (the argv)."""
    action()
    return result


# ------------------------------------------------------------------ the cases
# name: (argv builder, exit code, text the one line must contain). Builders get (world, case folder).
def user_file(path: Path, text: str = "mine") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


USER_DATA = {
    "a checkpoint-2 folder of the user's in output_dir": (
        lambda w, t: then(
            lambda: user_file(t / "out" / "checkpoint-2" / "notes.txt"),
            train(w, t, "--save_strategy", "steps", "--save_steps", "1"),
        ),
        BAD_INPUT,
        "checkpoint-2 was not written by ilora",
    ),
    "a file named like a checkpoint in output_dir": (
        lambda w, t: then(
            lambda: user_file(t / "out" / "checkpoint-9"),
            train(w, t, "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1"),
        ),
        BAD_INPUT,
        "checkpoint-9 was not written by ilora",
    ),
    "a user's checkpoint folder in a run's task directory": (
        lambda w, t: then(
            lambda: user_file(t / "out" / "ilora" / "tasks" / "1-a" / "checkpoint-1" / "x.txt"),
            run_config(w, t, lambda c: c.update(save_strategy="steps", save_steps=1)),
        ),
        BAD_INPUT,
        "checkpoint-1 was not written by ilora",
    ),
    "ema_adapter_path at a user folder": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(w["thesis"])),
        BAD_INPUT,
        "thesis already exists and is not an ilora adapter directory",
    ),
    "ema_adapter_path '.'": (
        lambda w, t: train(w, t, "--ema_adapter_path", "."),
        BAD_INPUT,
        "is not an ilora adapter directory",
    ),
    "ema_adapter_path = output_dir": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(t / "out")),
        BAD_INPUT,
        "would replace output_dir",
    ),
    "ema_adapter_path = output_dir/plastic": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(t / "out" / "plastic")),
        BAD_INPUT,
        "the plastic adapter and the stable adapter would both be written",
    ),
    "ema_adapter_path = output_dir/buffer": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(t / "out" / "buffer")),
        BAD_INPUT,
        "the stable adapter and the replay buffer would both be written",
    ),
    "ema_adapter_path holds output_dir": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(t), out=t / "sub" / "out"),
        BAD_INPUT,
        "is not an ilora adapter directory",
    ),
    "ema_adapter_path empty folder holding output_dir": (
        lambda w, t: then(
            lambda: (t / "empty").mkdir(), train(w, t, "--ema_adapter_path", str(t / "empty"), out=t / "empty" / "o")
        ),
        BAD_INPUT,
        "is not an ilora adapter directory",
    ),
    "ema_adapter_path = an ilora adapter, no overwrite": (
        lambda w, t: train(w, t, "--ema_adapter_path", str(task_copy(w, t) / "stable")),
        BAD_INPUT,
        "already holds an adapter or buffer; pass --overwrite_output_dir",
    ),
    "output_dir/plastic is a user folder": (
        lambda w, t: then(
            lambda: shutil.copytree(w["thesis"], t / "out" / "plastic"), train(w, t, "--overwrite_output_dir", "true")
        ),
        BAD_INPUT,
        "plastic already exists and is not an ilora adapter directory",
    ),
    "output_dir/buffer is a user folder": (
        lambda w, t: then(
            lambda: shutil.copytree(w["thesis"], t / "out" / "buffer"), train(w, t, "--overwrite_output_dir", "true")
        ),
        BAD_INPUT,
        "buffer already exists and is not an ilora buffer directory",
    ),
    "output_dir/plastic is a file": (
        lambda w, t: then(lambda: write_jsonl(t / "out" / "plastic", [{}]), train(w, t)),
        BAD_INPUT,
        "plastic is a file",
    ),
    "output_dir/stable is a link to a user folder": (
        lambda w, t: then(
            lambda: ((t / "out").mkdir(), (t / "out" / "stable").symlink_to(w["thesis"])),
            train(w, t, "--overwrite_output_dir", "true"),
        ),
        BAD_INPUT,
        "stable already exists and is not an ilora adapter directory",
    ),
    "output_dir is a file": (lambda w, t: train(w, t, out=w["data"]), BAD_INPUT, "good.jsonl is a file"),
    "output_dir inside a file": (lambda w, t: train(w, t, out=w["data"] / "out"), BAD_INPUT, "good.jsonl is a file"),
    "output_dir = previous_task_model": (
        lambda w, t: chained(w, t, "--overwrite_output_dir", "true", out=w["t1"]),
        BAD_INPUT,
        "is output_dir itself",
    ),
    "output_dir inside previous_task_model": (
        lambda w, t: chained(w, t, out=w["t1"] / "next"),
        BAD_INPUT,
        "which this task reads",
    ),
    "chained ema_adapter_path = output_dir/stable": (
        lambda w, t: chained(
            w, t, "--ema_adapter_path", str(w["t1"] / "stable"), "--overwrite_output_dir", "true", out=w["t1"]
        ),
        BAD_INPUT,
        "is output_dir itself",
    ),
    "output_dir name too long": (lambda w, t: train(w, t, out=t / ("x" * 300)), BAD_INPUT, "bytes; at most 255"),
    "run: output_dir is a file": (
        lambda w, t: run_config(w, t, lambda c: c.update(output_dir=str(w["data"]))),
        BAD_INPUT,
        "good.jsonl is a file",
    ),
    "run: method folder is the user's": (
        lambda w, t: then(lambda: shutil.copytree(w["thesis"], t / "out" / "ilora"), run_config(w, t)),
        BAD_INPUT,
        "is not an ilora run directory",
    ),
    "compare --out is a file": (
        lambda w, t: ["compare", str(w["run"] / "out" / "ilora"), "--out", str(w["data"])],
        BAD_INPUT,
        "good.jsonl is a file",
    ),
    "demo --output_dir is a file": (
        lambda w, t: ["demo", "--output_dir", str(w["data"])],
        BAD_INPUT,
        "good.jsonl is a file",
    ),
    "demo --seed negative": (
        lambda w, t: ["demo", "--seed", "-1", "--output_dir", str(t / "d")],
        BAD_INPUT,
        "--seed must be >= 0",
    ),
    "demo --seed with --full": (
        lambda w, t: ["demo", "--full", "--seed", "1", "--output_dir", str(t / "d")],
        BAD_INPUT,
        "the full benchmark runs seeds 0, 1 and 2",
    ),
    "demo --output_dir is a user folder": (
        lambda w, t: ["demo", "--output_dir", str(w["thesis"])],
        BAD_INPUT,
        "already holds files that are not an ilora demo",
    ),
    "compare --out holds a user's compare.md": (
        lambda w, t: then(
            lambda: (t / "compare.md").write_text("my notes"),
            ["compare", str(w["run"] / "out" / "ilora"), "--out", str(t)],
        ),
        BAD_INPUT,
        "compare.md exists and was not written by ilora compare",
    ),
}

DIVERGED_RUNS = {
    "train: huge learning rate": (lambda w, t: train(w, t, *HUGE_STEP), DIVERGED, "training diverged"),
    "train: two huge steps (finite weights, infinite logits)": (
        lambda w, t: train(w, t, *HUGE_STEP, "--max_steps", "2"),
        DIVERGED,
        "training diverged by the end of the task",
    ),
    "train: two huge steps under bf16 (finite, collapsed logits)": (
        lambda w, t: train(w, t, *HUGE_STEP, "--max_steps", "2", "--bf16", "true"),
        DIVERGED,
        "training diverged by the end of the task",
    ),
    "train: three huge steps under bf16": (
        lambda w, t: train(w, t, *HUGE_STEP, "--bf16", "true"),
        DIVERGED,
        "training diverged",
    ),
    "run: two huge steps under bf16, derpp": (
        lambda w, t: run_config(w, t, lambda c: c.update(HUGE_RUN, max_steps=2, bf16=True, method="derpp")),
        DIVERGED,
        "training diverged by the end of the task",
    ),
    "train: huge learning rate, seq-LoRA": (
        lambda w, t: train(w, t, *HUGE_STEP, "--use_ilora", "false"),
        DIVERGED,
        "training diverged",
    ),
    "train: huge learning rate, selective update": (
        lambda w, t: train(w, t, *HUGE_STEP, "--selective_update", "true"),
        DIVERGED,
        "training diverged",
    ),
    "train: diverged with checkpoints on": (
        lambda w, t: train(w, t, *HUGE_STEP, "--save_strategy", "steps", "--save_steps", "1"),
        DIVERGED,
        "training diverged by optimizer step",
    ),
    "train: huge learning rate, logging every step": (
        lambda w, t: train(w, t, *HUGE_STEP, "--logging_steps", "1", "--max_steps", "4"),
        DIVERGED,
        "training diverged by optimizer step",
    ),
    "run: ilora diverges": (lambda w, t: run_config(w, t, lambda c: c.update(HUGE_RUN)), DIVERGED, "training diverged"),
    "run: er diverges": (
        lambda w, t: run_config(w, t, lambda c: c.update(HUGE_RUN, method="er")),
        DIVERGED,
        "training diverged",
    ),
    "run: joint diverges": (
        lambda w, t: run_config(w, t, lambda c: c.update(HUGE_RUN, method="joint")),
        DIVERGED,
        "training diverged",
    ),
}

SETTINGS = {
    "consistency_weight nan": (
        lambda w, t: train(w, t, "--consistency_weight", "nan"),
        BAD_INPUT,
        "consistency_weight=nan",
    ),
    "consistency_weight inf": (
        lambda w, t: train(w, t, "--consistency_weight", "inf"),
        BAD_INPUT,
        "consistency_weight=inf",
    ),
    "min_update_threshold nan": (
        lambda w, t: train(w, t, "--min_update_threshold", "nan"),
        BAD_INPUT,
        "min_update_threshold=nan",
    ),
    "ema_alpha nan": (lambda w, t: train(w, t, "--ema_alpha", "nan"), BAD_INPUT, "ema_alpha=nan"),
    "lora_alpha 0": (lambda w, t: train(w, t, "--lora_alpha", "0"), BAD_INPUT, "lora_alpha=0 must be > 0"),
    "lora_alpha negative": (lambda w, t: train(w, t, "--lora_alpha", "-16"), BAD_INPUT, "lora_alpha=-16 must be > 0"),
    "lora_dropout nan": (lambda w, t: train(w, t, "--lora_dropout", "nan"), BAD_INPUT, "lora_dropout=nan"),
    "lora_rank 0": (lambda w, t: train(w, t, "--lora_rank", "0"), BAD_INPUT, "lora_rank=0 must be >= 1"),
    "learning_rate negative": (lambda w, t: train(w, t, "--learning_rate", "-0.01"), BAD_INPUT, "learning_rate=-0.01"),
    "learning_rate nan": (lambda w, t: train(w, t, "--learning_rate", "nan"), BAD_INPUT, "learning_rate=nan"),
    "learning_rate inf": (lambda w, t: train(w, t, "--learning_rate", "inf"), BAD_INPUT, "learning_rate=inf"),
    "zero epochs": (
        lambda w, t: train(w, t, "--num_train_epochs", "0", "--max_steps", "-1"),
        BAD_INPUT,
        "trains no step",
    ),
    "negative max_steps, zero epochs": (
        lambda w, t: train(w, t, "--num_train_epochs", "0", "--max_steps", "-3"),
        BAD_INPUT,
        "trains no step",
    ),
    "negative epochs": (
        lambda w, t: train(w, t, "--num_train_epochs", "-1", "--max_steps", "-1"),
        BAD_INPUT,
        "num_train_epochs=-1.0",
    ),
    "batch size 0": (
        lambda w, t: train(w, t, "--per_device_train_batch_size", "0"),
        BAD_INPUT,
        "per_device_train_batch_size=0",
    ),
    "gradient accumulation 0": (
        lambda w, t: train(w, t, "--gradient_accumulation_steps", "0"),
        BAD_INPUT,
        "gradient_accumulation_steps=0",
    ),
    "max_grad_norm nan": (lambda w, t: train(w, t, "--max_grad_norm", "nan"), BAD_INPUT, "max_grad_norm=nan"),
    "max_grad_norm negative": (lambda w, t: train(w, t, "--max_grad_norm", "-1"), BAD_INPUT, "max_grad_norm=-1.0"),
    "weight_decay nan": (lambda w, t: train(w, t, "--weight_decay", "nan"), BAD_INPUT, "weight_decay=nan"),
    "warmup negative": (lambda w, t: train(w, t, "--warmup_steps", "-5"), BAD_INPUT, "warmup_steps"),
    "adam_beta1 1.5": (lambda w, t: train(w, t, "--adam_beta1", "1.5"), BAD_INPUT, "adam_beta1=1.5"),
    "logging_steps 0": (lambda w, t: train(w, t, "--logging_steps", "0"), BAD_INPUT, "logging_steps"),
    "replay batch negative": (lambda w, t: train(w, t, "--replay_batch_size", "-1"), BAD_INPUT, "replay_batch_size=-1"),
    "replay budget in rows and in tokens": (
        lambda w, t: train(w, t, "--replay_budget_tokens", "300"),
        BAD_INPUT,
        "replay_budget_tokens=300 and ilora_buffer_size=",
    ),
    "replay policy misspelt": (
        lambda w, t: train(w, t, "--replay_policy", "suprise"),
        BAD_INPUT,
        "replay_policy='suprise' is not one of",
    ),
    "chained with another replay policy": (
        lambda w, t: chained(w, t, "--replay_policy", "balanced"),
        BAD_INPUT,
        "this task's replay buffer (balanced,",
    ),
    "cutoff_len 0": (lambda w, t: train(w, t, "--cutoff_len", "0"), BAD_INPUT, "cutoff_len=0"),
    "yaml: consistency_weight .nan": (
        lambda w, t: yaml_train(w, t, "consistency_weight: .nan\n"),
        BAD_INPUT,
        "consistency_weight=nan",
    ),
    "yaml: hidden_state_layers empty": (
        lambda w, t: yaml_train(w, t, "hidden_state_layers: []\n"),
        BAD_INPUT,
        "hidden_state_layers",
    ),
    "run: eval_batch_size 0": (
        lambda w, t: run_config(w, t, lambda c: c.update(eval_batch_size=0)),
        BAD_INPUT,
        "eval_batch_size=0",
    ),
    "run: eval_batch_size negative": (
        lambda w, t: run_config(w, t, lambda c: c.update(eval_batch_size=-4)),
        BAD_INPUT,
        "eval_batch_size=-4",
    ),
    "run: eval_max_rows 0": (
        lambda w, t: run_config(w, t, lambda c: c.update(eval_max_rows=0)),
        BAD_INPUT,
        "eval_max_rows=0",
    ),
    "bf16 maybe": (lambda w, t: train(w, t, "--bf16", "maybe"), BAD_INPUT, "bf16='maybe' must be auto, true or false"),
    "run: max_new_tokens 0": (
        lambda w, t: run_config(w, t, lambda c: c.update(max_new_tokens=0)),
        BAD_INPUT,
        "max_new_tokens=0",
    ),
    "seed negative": (lambda w, t: train(w, t, "--seed", "-1"), BAD_INPUT, "seed=-1 must be in [0, 2**32)"),
    "dataloader workers negative": (
        lambda w, t: train(w, t, "--dataloader_num_workers", "-1"),
        BAD_INPUT,
        "dataloader_num_workers=-1",
    ),
    "save_total_limit 0": (lambda w, t: train(w, t, "--save_total_limit", "0"), BAD_INPUT, "save_total_limit=0"),
    "eval batch size 0": (
        lambda w, t: train(w, t, "--per_device_eval_batch_size", "0"),
        BAD_INPUT,
        "per_device_eval_batch_size=0",
    ),
    "a logger that is not installed": (
        lambda w, t: train(w, t, "--report_to", missing_logger()),
        BAD_INPUT,
        "that logger is not installed",
    ),
    "run: learning_rate .inf": (
        lambda w, t: run_config(w, t, lambda c: c.update(learning_rate=float("inf"))),
        BAD_INPUT,
        "learning_rate=inf",
    ),
}

STALE_RESULTS = {
    "test file replaced": (
        run_copy_then(lambda r: write_jsonl(r / "alpha.test.jsonl", sentiment_rows(20, offset=7))),
        BAD_INPUT,
        "the test file of task 'alpha' changed since",
    ),
    "train file replaced": (
        run_copy_then(lambda r: write_jsonl(r / "beta.jsonl", sentiment_rows(16, offset=9))),
        BAD_INPUT,
        "the train file of task 'beta' changed since",
    ),
    "tokenizer replaced": (
        run_copy_then(lambda r: tiny_tokenizer(chat_template=True).save_pretrained(r / "model")),
        BAD_INPUT,
        "the model's tokenizer changed since",
    ),
    "base weights replaced": (
        run_copy_then(lambda r: save_tiny_model(r / "model", seed=5)),
        BAD_INPUT,
        "the base model's weights changed since",
    ),
    "a setting changed": (
        lambda w, t: run_copy(w, t, lambda c: c.update(learning_rate=0.5)),
        BAD_INPUT,
        "was started with other settings (learning_rate: 0.01 -> 0.5)",
    ),
    "settings.json damaged": (
        run_copy_then(lambda r: (r / "out/ilora/settings.json").write_text("{")),
        BAD_INPUT,
        "settings.json: damaged run settings",
    ),
    "max_new_tokens changed after the run finished": (
        lambda w, t: run_copy(w, t, lambda c: c.update(max_new_tokens=40)),
        BAD_INPUT,
        "other settings (max_new_tokens: 16 -> 40)",
    ),
    "eval_batch_size changed": (
        lambda w, t: run_copy(w, t, lambda c: c.update(eval_batch_size=3)),
        BAD_INPUT,
        "other settings (eval_batch_size: 16 -> 3)",
    ),
    "a task's choices changed": (
        lambda w, t: run_copy(w, t, lambda c: c["tasks"][1].update(choices=c["tasks"][1]["choices"][::-1])),
        BAD_INPUT,
        "other settings (tasks:",
    ),
    "a trainer setting outside any list changed": (
        lambda w, t: run_copy(w, t, lambda c: c.update(label_smoothing_factor=0.1)),
        BAD_INPUT,
        "other settings (label_smoothing_factor: 0.0 -> 0.1)",
    ),
}

WRONG_ANSWERS = {
    "compare: different task sets": (
        lambda w, t: ["compare", str(w["run"] / "out" / "ilora"), str(one_task_run(w, t))],
        BAD_INPUT,
        "runs over different tasks cannot be compared",
    ),
    "eval: adapter on another base": (
        lambda w, t: [
            "eval",
            "--model",
            str(save_tiny_model(t / "other", seed=9)),
            "--adapter",
            str(w["run"] / "out" / "ilora" / "tasks" / "1-alpha"),
            "--tasks",
            str(w["run"] / "config.yaml"),
        ],
        BAD_INPUT,
        "was trained on base model",
    ),
    "compare: runs scored on other test files": (
        lambda w, t: [
            "compare",
            str(w["run"] / "out" / "ilora"),
            str(
                then(
                    lambda: edit_json(
                        t / "run/out/ilora/metrics.json", lambda m: m["inputs"]["test"].update(alpha="0" * 64)
                    ),
                    copy_of(w, t, "run") / "out" / "ilora",
                )
            ),
        ],
        BAD_INPUT,
        "scored task 'alpha' on different test files",
    ),
    "eval: a PEFT adapter made for another architecture": (
        lambda w, t: [
            "eval",
            "--model",
            str(save_tiny_model(t / "wide", hidden_size=64)),
            "--adapter",
            str(then(lambda: shutil.copytree(w["t1"] / "plastic", t / "adapter"), t / "adapter")),
            "--tasks",
            str(w["run"] / "config.yaml"),
        ],
        BAD_INPUT,
        "does not fit this model",
    ),
}


def missing_logger() -> str:
    from transformers.integrations import get_available_reporting_integrations

    return next(
        n for n in ("wandb", "mlflow", "clearml", "comet_ml") if n not in get_available_reporting_integrations()
    )


def one_task_run(w, t) -> Path:
    """A finished run whose metrics.json covers one task only (written as ilora writes it)."""
    run = t / "single" / "ilora"
    run.mkdir(parents=True)
    summary = json.loads((w["run"] / "out" / "ilora" / "metrics.json").read_text())
    summary["tasks"] = ["alpha"]
    summary["matrices"] = {a: [row[:1] for row in R] for a, R in summary["matrices"].items()}
    (run / "metrics.json").write_text(json.dumps(summary))
    return run


COMMON_MISTAKES = {
    "lora_target typo": (
        lambda w, t: train(w, t, "--lora_target", "q_prj,v_proj"),
        BAD_INPUT,
        "lora_target 'q_prj' names no module of this model (did you mean 'q_proj'?)",
    ),
    "task named 2020": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(name=2020)),
        BAD_INPUT,
        "task name=2020 must be a string (YAML reads unquoted",
    ),
    "alpaca instruction is a number": (
        lambda w, t: train(w, t, data=write_jsonl(t / "alpaca.jsonl", [{"instruction": 7, "output": "a"}])),
        BAD_INPUT,
        "alpaca.jsonl:1: 'instruction' must be a string",
    ),
    "alpaca input is a list": (
        lambda w, t: train(
            w, t, data=write_jsonl(t / "alpaca.jsonl", [{"instruction": "a", "input": [1], "output": "b"}])
        ),
        BAD_INPUT,
        "alpaca.jsonl:1: 'input' must be a string",
    ),
    "model without tokenizer files": (
        lambda w, t: ["train", "--model", str(model_without_tokenizer(w, t)), *train(w, t)[3:]],
        BAD_INPUT,
        "has no tokenizer files",
    ),
    "dataset is a directory": (
        lambda w, t: train(w, t, data=w["thesis"]),
        BAD_INPUT,
        "thesis: a directory, but not one written by Dataset.save_to_disk",
    ),
    "run config without a model": (
        lambda w, t: run_config(w, t, lambda c: c.pop("model_name_or_path")),
        BAD_INPUT,
        "no model: set model_name_or_path",
    ),
    "damaged model weights": (
        lambda w, t: ["train", "--model", str(then(lambda: None, damaged_model(w, t))), *train(w, t)[3:]],
        BAD_INPUT,
        "its weights in",
    ),
    "260-character task id": (lambda w, t: train(w, t, "--current_task_id", "t" * 260), BAD_INPUT, "at most 100"),
    "260-character task name in a run": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(name="a" * 260)),
        BAD_INPUT,
        "at most 100",
    ),
    "test row choices a string": (
        lambda w, t: run_config(
            w,
            t,
            lambda c: (
                write_jsonl(t / "c.jsonl", [{"prompt": "x", "response": "yes", "choices": "yes"}]),
                c["tasks"][0].update(test=str(t / "c.jsonl"), choices=None),
            ),
        ),
        BAD_INPUT,
        "c.jsonl:1: choices must be a list",
    ),
}


def damaged_model(w, t) -> Path:
    model = copy_of(w, t, "model")
    (model / "model.safetensors").write_bytes(b"xx")
    return model


def model_without_tokenizer(w, t) -> Path:
    model = copy_of(w, t, "model")
    for path in model.iterdir():
        if "token" in path.name:
            path.unlink()
    return model


def damaged_task(change):
    """Copy t1, damage it with `change(copy)`, and chain a new task on it."""

    def build(w, t):
        copy = task_copy(w, t)
        change(copy)
        return train(w, t, "--previous_task_model", str(copy))

    return build


CORRUPT_STATE = {
    "truncated adapter weights": (
        damaged_task(
            lambda d: (d / "plastic" / "adapter_model.safetensors").write_bytes(
                (d / "plastic" / "adapter_model.safetensors").read_bytes()[:100]
            )
        ),
        BAD_INPUT,
        "plastic/adapter_model.safetensors: damaged adapter weights",
    ),
    "empty adapter weights": (
        damaged_task(lambda d: (d / "stable" / "adapter_model.safetensors").write_bytes(b"")),
        BAD_INPUT,
        "stable/adapter_model.safetensors: damaged adapter weights",
    ),
    "random adapter weights": (
        damaged_task(lambda d: (d / "plastic" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)),
        BAD_INPUT,
        "damaged adapter weights",
    ),
    "NaN in the stable adapter": (damaged_task(lambda d: poison(d / "stable")), BAD_INPUT, "holds NaN or inf"),
    "adapter config not JSON": (
        damaged_task(lambda d: (d / "plastic" / "adapter_config.json").write_text("{r: 4")),
        BAD_INPUT,
        "adapter_config.json: damaged adapter config",
    ),
    "manifest not JSON": (
        damaged_task(lambda d: (d / "ilora_task.json").write_text('{"task_id": ')),
        BAD_INPUT,
        "ilora_task.json: damaged task manifest, not valid JSON",
    ),
    "manifest with a wrong rank": (
        lambda w, t: (
            damaged_task(lambda d: edit_json(d / "ilora_task.json", lambda m: m["lora"].update(r=8)))(w, t)
            + ["--lora_rank", "8", "--lora_alpha", "8"]
        ),
        BAD_INPUT,
        "rank r=4 but the task manifest says r=8",
    ),
    "manifest with a text step count": (
        damaged_task(lambda d: edit_json(d / "ilora_task.json", lambda m: m.update(sequence_steps="2"))),
        BAD_INPUT,
        "damaged task manifest ('sequence_steps' is '2')",
    ),
    "manifest a list": (
        damaged_task(lambda d: (d / "ilora_task.json").write_text("[]")),
        BAD_INPUT,
        "damaged task manifest (not a JSON object)",
    ),
    "buffer.json names fewer rows": (
        damaged_task(lambda d: edit_json(d / "buffer" / "buffer.json", lambda b: b["task_ids"].pop())),
        BAD_INPUT,
        "replay buffer in",
    ),
    "buffer.json capacity below its rows": (
        damaged_task(lambda d: edit_json(d / "buffer" / "buffer.json", lambda b: b.update(capacity=1))),
        BAD_INPUT,
        "rows with capacity 1",
    ),
    "buffer.json rng state damaged": (
        damaged_task(lambda d: edit_json(d / "buffer" / "buffer.json", lambda b: b.update(rng_state=[3]))),
        BAD_INPUT,
        "'rng_state' in buffer.json is not a saved random state",
    ),
    "buffer.json not JSON": (
        damaged_task(lambda d: (d / "buffer" / "buffer.json").write_text("{")),
        BAD_INPUT,
        "is unreadable",
    ),
    "buffer tensors random": (
        damaged_task(lambda d: (d / "buffer" / "buffer.safetensors").write_bytes(b"\x00" * 64)),
        BAD_INPUT,
        "is unreadable",
    ),
    "run: eval.json not JSON": (
        run_copy_then(lambda r: (r / "out/ilora/tasks/1-alpha/eval.json").write_text("{")),
        BAD_INPUT,
        "1-alpha/eval.json: damaged evaluation file",
    ),
    "run: eval.json of other rows": (
        run_copy_then(
            lambda r: edit_json(
                r / "out/ilora/tasks/2-beta/eval.json", lambda e: e["scores"]["stable"]["alpha"]["predictions"].pop()
            )
        ),
        BAD_INPUT,
        "predictions of stable on task 'alpha', the test set has 16 rows",
    ),
    "run: eval.json accuracy NaN": (
        run_copy_then(
            lambda r: edit_json(
                r / "out/ilora/tasks/2-beta/eval.json",
                lambda e: e["scores"]["plastic"]["beta"].update(accuracy=math.nan),
            )
        ),
        BAD_INPUT,
        "accuracy of plastic on task 'beta' is nan",
    ),
    "run: base_eval.json not JSON": (
        run_copy_then(lambda r: (r / "out/base_eval.json").write_text("[")),
        BAD_INPUT,
        "base_eval.json: damaged base-model evaluation",
    ),
    "run: finished task's adapter NaN": (
        run_copy_then(lambda r: poison(r / "out/ilora/tasks/1-alpha/plastic")),
        BAD_INPUT,
        "holds NaN or inf",
    ),
    "run: finished task's buffer damaged": (
        run_copy_then(lambda r: (r / "out/ilora/tasks/2-beta/buffer/buffer.json").write_text("{}")),
        BAD_INPUT,
        "'capacity' in buffer.json is None",
    ),
    "compare: metrics.json not JSON": (
        lambda w, t: ["compare", str(damaged_metrics(w, t, None))],
        BAD_INPUT,
        "metrics.json: damaged run summary, not valid JSON",
    ),
    "compare: metrics.json with NaN": (
        lambda w, t: ["compare", str(damaged_metrics(w, t, math.nan))],
        BAD_INPUT,
        "metrics.json: damaged (the stable metrics are missing or not finite)",
    ),
    "resume: damaged adapter in a checkpoint": (
        lambda w, t: then(
            lambda: (
                shutil.copytree(w["t1"] / "plastic", t / "out" / "checkpoint-1" / "plastic"),
                (t / "out" / "checkpoint-1" / "plastic" / "adapter_model.safetensors").write_bytes(b"\0" * 10),
                checkpoint_marker(w, t / "out" / "checkpoint-1"),
            ),
            train(w, t, "--resume_from_checkpoint", str(t / "out" / "checkpoint-1")),
        ),
        BAD_INPUT,
        "checkpoint-1/plastic/adapter_model.safetensors: damaged adapter weights",
    ),
    "resume: damaged trainer state": (
        lambda w, t: then(
            lambda: (
                shutil.copytree(w["t1"] / "plastic", t / "out" / "checkpoint-1" / "plastic"),
                (t / "out" / "checkpoint-1" / "trainer_state.json").write_text("{"),
                checkpoint_marker(w, t / "out" / "checkpoint-1"),
            ),
            train(w, t, "--resume_from_checkpoint", str(t / "out" / "checkpoint-1")),
        ),
        BAD_INPUT,
        "trainer_state.json: damaged trainer state",
    ),
    "resume: damaged checkpoint marker": (
        lambda w, t: then(
            lambda: (
                shutil.copytree(w["t1"] / "plastic", t / "out" / "checkpoint-1" / "plastic"),
                (t / "out" / "checkpoint-1" / "ilora_checkpoint.json").write_text("{"),
            ),
            train(w, t, "--resume_from_checkpoint", str(t / "out" / "checkpoint-1")),
        ),
        BAD_INPUT,
        "ilora_checkpoint.json: damaged checkpoint marker",
    ),
}


def damaged_metrics(w, t, ap) -> Path:
    """A copy of the finished run whose metrics.json is cut short (`ap` None) or holds AP = `ap`."""
    run = copy_of(w, t, "run") / "out" / "ilora"
    if ap is None:
        (run / "metrics.json").write_text("{")
    else:
        edit_json(run / "metrics.json", lambda m: m["metrics"]["stable"].update(AP=ap))
    return run


def alias_bomb(indent: str) -> str:
    """YAML list items that expand to 9^9 (387 million) values: nine aliases of nine aliases of ..."""
    lines = [f"{indent}- &x0 [0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    lines += [f"{indent}- &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


UNBOUNDED = {
    "alias bomb in hidden_state_layers": (
        lambda w, t: yaml_train(w, t, "hidden_state_layers:\n" + alias_bomb("  ")),
        BAD_INPUT,
        "expands to",
    ),
    "alias bomb in a task's choices": (
        lambda w, t: run_config(
            w,
            t,
            text=f"model_name_or_path: {w['model']}\noutput_dir: out\ntasks:\n  - name: a\n"
            f"    train: {w['data']}\n    test: {w['data']}\n    choices:\n" + alias_bomb("      "),
        ),
        BAD_INPUT,
        "expands to",
    ),
    "recursive alias": (lambda w, t: yaml_train(w, t, "hidden_state_layers: &r [*r]\n"), BAD_INPUT, "invalid YAML"),
    "config over 1 MiB": (
        lambda w, t: yaml_train(w, t, "# " + "x" * (1 << 20) + "\n"),
        BAD_INPUT,
        "a config may be at most",
    ),
    "deeply nested": (
        lambda w, t: yaml_train(w, t, "hidden_state_layers: " + "[" * 5000 + "]" * 5000 + "\n"),
        BAD_INPUT,
        "train.yaml: nested too deeply",
    ),
}


SMALL_THINGS = {
    "choices is a string": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(choices="positive")),
        BAD_INPUT,
        "choices must be a list of answers, got 'positive'",
    ),
    "an empty choice": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(choices=["positive", ""])),
        BAD_INPUT,
        "a choice is empty",
    ),
    "a repeated choice": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(choices=["positive", "positive", "negative"])),
        BAD_INPUT,
        "choices repeat ['positive']",
    ),
    "one choice": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(choices=["positive"])),
        BAD_INPUT,
        "at least two choices",
    ),
    "choices yes/no unquoted": (
        lambda w, t: run_config(
            w,
            t,
            text=f"model_name_or_path: {w['model']}\ntasks:\n  - {{name: a, "
            f"train: {w['data']}, test: {w['data']}, choices: [yes, no]}}\n",
        ),
        BAD_INPUT,
        "YAML reads unquoted",
    ),
    "lora_target list of numbers": (
        lambda w, t: yaml_train(w, t, "lora_target: [1, 2]\n"),
        BAD_INPUT,
        "lora_target must be a list of module names",
    ),
}


def data_file(t: Path, name: str, content: str | bytes) -> Path:
    path = t / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def fifo(t: Path) -> Path:
    os.mkfifo(t / "pipe.jsonl")
    return t / "pipe.jsonl"


MESSAGES = {
    "a lone surrogate in a JSON Lines row": (
        lambda w, t: train(w, t, data=data_file(t, "s.jsonl", '{"prompt": "a\\ud83db", "response": "positive"}\n')),
        BAD_INPUT,
        "s.jsonl:1: 'prompt' holds a lone UTF-16 surrogate",
    ),
    "an object around the rows in a .json file": (
        lambda w, t: train(w, t, data=data_file(t, "o.json", json.dumps({"data": sentiment_rows(4)}))),
        BAD_INPUT,
        "its key 'data' holds a list of rows",
    ),
    "a pretty-printed object in a .json file": (
        lambda w, t: train(w, t, data=data_file(t, "p.json", json.dumps(sentiment_rows(1)[0], indent=2))),
        BAD_INPUT,
        "holds one JSON object over 4 lines",
    ),
    "garbage named .parquet": (
        lambda w, t: train(w, t, data=data_file(t, "g.parquet", bytes(range(256)))),
        BAD_INPUT,
        "g.parquet: not a Parquet file (it does not start with PAR1)",
    ),
    "JSON Lines named .parquet": (
        lambda w, t: train(w, t, data=data_file(t, "j.parquet", w["data"].read_bytes())),
        BAD_INPUT,
        "it looks like JSON: name it .jsonl or .json",
    ),
    "a damaged Parquet file": (
        lambda w, t: train(w, t, data=data_file(t, "d.parquet", b"PAR1" + bytes(64))),
        BAD_INPUT,
        "d.parquet: cannot be read as parquet",
    ),
    "a dataset that is a pipe": (lambda w, t: train(w, t, data=fifo(t)), BAD_INPUT, "pipe.jsonl: not a regular file"),
    "general: names a directory": (
        lambda w, t: run_config(w, t, lambda c: c.update(general=str(w["thesis"]))),
        BAD_INPUT,
        "thesis: a directory, not a file",
    ),
    "a CSV label cell left empty": (
        lambda w, t: train(w, t, data=data_file(t, "e.csv", "prompt,response\nnice,1\nbad,\n")),
        BAD_INPUT,
        "e.csv row 2: 'response' is empty",
    ),
}


def json_config(w, t, text: str) -> list[str]:
    path = t / "train.json"
    path.write_text(text)
    return ["train", str(path)]


SILENT_SUCCESS = {
    "hidden_state_layers [0]: the embeddings": (
        lambda w, t: train(w, t, "--hidden_state_layers", "0"),
        BAD_INPUT,
        "only the embeddings' output",
    ),
    "max_steps 0 next to epochs": (
        lambda w, t: train(w, t, "--max_steps", "0", "--num_train_epochs", "2"),
        BAD_INPUT,
        "max_steps=0 is not a number of steps",
    ),
    "output_dir: null in a run config": (
        lambda w, t: run_config(w, t, lambda c: c.update(output_dir=None)),
        BAD_INPUT,
        "output_dir is None: name a directory",
    ),
    "a run config's dataset key": (
        lambda w, t: run_config(w, t, lambda c: c.update(dataset=str(w["data"]))),
        BAD_INPUT,
        "'dataset' is a setting of one `ilora train`",
    ),
    "a run config's previous_task_model": (
        lambda w, t: run_config(w, t, lambda c: c.update(previous_task_model=str(w["t1"]))),
        BAD_INPUT,
        "'previous_task_model' is a setting of one `ilora train`",
    ),
    "a key twice in a YAML config": (
        lambda w, t: yaml_train(w, t, "learning_rate: 0.1\nlearning_rate: 0.2\n"),
        BAD_INPUT,
        "key 'learning_rate' appears twice",
    ),
    "a key twice in a run config": (
        lambda w, t: run_config(w, t, text=f"model_name_or_path: {w['model']}\nmax_steps: 1\nmax_steps: 2\n"),
        BAD_INPUT,
        "key 'max_steps' appears twice",
    ),
    "exact_match scoring on a task with choices": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(scoring="exact_match")),
        BAD_INPUT,
        "choices are read only by scoring: choice",
    ),
    "compare: the same run twice": (
        lambda w, t: ["compare", str(w["run"] / "out" / "ilora"), str(w["run"] / "out" / "ilora")],
        BAD_INPUT,
        "is given twice",
    ),
    "compare: a run and its copy": (
        lambda w, t: ["compare", str(w["run"] / "out" / "ilora"), str(copy_of(w, t, "run") / "out" / "ilora")],
        BAD_INPUT,
        "hold the same run (identical metrics.json)",
    ),
    "a .json config holding YAML": (
        lambda w, t: json_config(w, t, f"model: {w['model']}\n"),
        BAD_INPUT,
        "train.json: not valid JSON",
    ),
    "a key twice in a .json config": (
        lambda w, t: json_config(w, t, json.dumps({"model": str(w["model"])})[:-1] + ', "model": "x"}'),
        BAD_INPUT,
        "key 'model' appears twice in one object",
    ),
}

TABLES = {
    "user data": USER_DATA,
    "diverged": DIVERGED_RUNS,
    "settings": SETTINGS,
    "stale results": STALE_RESULTS,
    "wrong answers": WRONG_ANSWERS,
    "common mistakes": COMMON_MISTAKES,
    "corrupt state": CORRUPT_STATE,
    "unbounded": UNBOUNDED,
    "small things": SMALL_THINGS,
    "messages": MESSAGES,
    "silent success": SILENT_SUCCESS,
    "adapter files": ADAPTER_FILES,
    "identity": IDENTITY,
    "damaged state": DAMAGED_STATE,
}
CASES = {f"{table}: {name}": case for table, cases in TABLES.items() for name, case in cases.items()}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under the roots, with a digest of each file's bytes (links by their target)."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                state[str(path)] = f"link:{path.readlink()}"
            elif path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[str(path)] = "dir"
    return state


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_of_the_users_touched(case, world, tmp_path, capsys, monkeypatch):
    build, code, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = build(world, tmp_path)
    before = snapshot(world["root"], tmp_path)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("{", "resuming"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ilora") and message in lines[0], lines[0]
    after = snapshot(world["root"], tmp_path)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"changed or deleted: {changed}"
    added = [p for p in after if p not in before]
    finished = [p for p in added if Path(p).name in ("ilora_task.json", "eval.json", "metrics.json", "report.md")]
    assert not finished, f"written as finished: {finished}"
    if code == BAD_INPUT:
        assert not added, f"bad input wrote {added}"


# ------------------------------------------------------------ beyond refusals
def test_a_diverged_run_leaves_no_checkpoint_with_nan(world, tmp_path):
    out = tmp_path / "out"
    argv = train(world, tmp_path, *HUGE_STEP, "--save_strategy", "steps", "--save_steps", "1")
    assert main(argv) == DIVERGED
    for checkpoint in out.glob("checkpoint-*"):
        if (checkpoint / "ilora_checkpoint.json").is_file():
            for tensor in load_file(str(next(checkpoint.rglob("*.safetensors")))).values():
                assert torch.isfinite(tensor).all(), checkpoint
    assert not (out / "ilora_task.json").exists()


def test_a_failed_start_does_not_block_the_corrected_retry(world, tmp_path):
    # diverges in task 1: settings.json and base_eval.json are written, no task finished, no checkpoint
    argv = run_config(world, tmp_path, lambda c: c.update(HUGE_RUN))
    assert main(argv) == DIVERGED
    assert (tmp_path / "out" / "ilora" / "settings.json").is_file()
    argv = run_config(world, tmp_path)
    assert main(argv) == 0
    assert (tmp_path / "out" / "ilora" / "metrics.json").is_file()


def test_paths_in_a_config_are_read_from_its_directory(world, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "configs"
    shutil.copytree(world["model"], folder / "model")
    write_jsonl(folder / "data.jsonl", sentiment_rows(8))
    (folder / "train.yaml").write_text(
        "model: model\ndataset: data.jsonl\noutput_dir: out\n"
        "lora_target: [q_proj, v_proj]\nmax_steps: 1\nreport_to: none\nuse_cpu: true\n"
    )
    assert main(["train", str(folder / "train.yaml")]) == 0
    assert (folder / "out" / "ilora_task.json").is_file() and not any(elsewhere.iterdir())
    manifest = json.loads((folder / "out" / "ilora_task.json").read_text())
    assert manifest["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_export_of_a_run_takes_its_own_last_task_whatever_else_tasks_holds(world, tmp_path):
    run = stray_folder_in_tasks(world, tmp_path)
    assert main(["export", str(run), "--output", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "ilora_export.json").read_text())["task_dir"].endswith("2-beta")
    assert (run / "tasks" / "9-notes" / "todo.txt").read_text() == "mine"


def test_a_json_config_trains_like_the_same_yaml(world, tmp_path):
    settings = {
        "model": str(world["model"]),
        "dataset": str(world["data"]),
        "output_dir": str(tmp_path / "out"),
        "lora_target": "q_proj",
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
    }
    (tmp_path / "train.json").write_text(json.dumps(settings))
    assert main(["train", str(tmp_path / "train.json")]) == 0
    assert json.loads((tmp_path / "out" / "ilora_task.json").read_text())["lora"]["target_modules"] == ["q_proj"]


def test_a_csv_label_column_of_numbers_is_read_as_text(world, tmp_path):
    path = data_file(tmp_path, "n.csv", "prompt,response\n" + "".join(f"review {i},{i % 2}\n" for i in range(8)))
    assert main(train(world, tmp_path, data=path)) == 0
    assert (tmp_path / "out" / "ilora_task.json").is_file()


def test_no_library_noise_on_a_command_that_quantizes_nothing(world, tmp_path):
    """A user's first sight of ilora is not library noise: no bitsandbytes kernel download, no DeepSpeed
    accelerator guess, no FutureWarning (PEFT's read of transformers' deprecated `is_gradient_checkpointing`
    included) on a training run that uses neither bitsandbytes nor DeepSpeed."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "ilora.cli", *train(world, tmp_path, "--save_strategy", "steps", "--save_steps", "2")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout + result.stderr
    for noise in ("gemm_4bit_forward", "Setting accelerator to CPU", "FutureWarning", "is_gradient_checkpointing"):
        assert noise not in said, said[-2000:]


def test_a_byte_order_mark_is_accepted_in_data_and_config(world, tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + world["data"].read_bytes())
    config = tmp_path / "bom.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + f"model: {world['model']}\ndataset: {data}\noutput_dir: out\n".encode())
    assert main(["train", str(config), *TRAIN]) == 0


def test_a_resumed_run_says_so(world, tmp_path, caplog):
    argv = train(world, tmp_path, "--save_strategy", "steps", "--save_steps", "1")
    assert main(argv) == 0
    (tmp_path / "out" / "ilora_task.json").unlink()
    caplog.set_level("INFO")
    assert main(argv + ["--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"]) == 0
    assert any("resuming from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)


def test_ctrl_c_is_one_line_saying_how_to_resume(world, tmp_path, capsys, monkeypatch):
    from ilora.pipeline import task

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(task, "train_task", interrupted)
    assert main(train(world, tmp_path)) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "--resume_from_checkpoint true" in err


def test_help_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    for command in (["--help"], ["train", "--help"]):
        # a reader that leaves at once: the writer gets EPIPE on a large write
        pipe = subprocess.Popen(
            [sys.executable, "-m", "ilora.cli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        pipe.stdout.close()
        _, err = pipe.communicate(timeout=120)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
        assert pipe.returncode in (0, 141)


def test_compare_aligns_runs_by_task_name(world, tmp_path):
    from ilora.evaluation.report import compare, final_accuracy, load_summary

    first = world["run"] / "out" / "ilora"
    reordered = copy_of(world, tmp_path, "run") / "out" / "ilora"
    summary = load_summary(first)
    flipped = {
        **summary,
        "tasks": summary["tasks"][::-1],
        "matrices": {a: [row[::-1] for row in R] for a, R in summary["matrices"].items()},
    }
    (reordered / "metrics.json").write_text(json.dumps(flipped))
    for adapter in summary["matrices"]:
        assert final_accuracy(flipped, adapter, summary["tasks"]) == summary["matrices"][adapter][-1]
    assert "| ilora (stable) |" in compare([first, reordered], tmp_path / "cmp")


def test_a_run_continues_when_only_settings_that_cannot_change_results_changed(world, tmp_path, monkeypatch):
    from ilora import ILoRATrainer

    argv = run_copy(
        world, tmp_path, lambda c: c.update(logging_steps=7, disable_tqdm=False, save_steps=3, report_to="none")
    )
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("a finished task was retrained"))
    assert main(argv) == 0


# Every field of ilora's own argument classes, reviewed: it can change a run's results (guarded) or it
# is on rundir.NOT_RESULTS. A new field fails here until it is put on one side.
GUARDED_FIELDS = {
    "model": {
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "trust_remote_code",
        "quantization_bit",
        "quantization_type",
        "double_quantization",
    },
    "data": {"cutoff_len", "use_chat_template"},
    "continual": {
        "method",
        "use_ilora",
        "ilora_buffer_size",
        "replay_budget_tokens",
        "replay_policy",
        "replay_batch_size",
        "previous_task_model",
        "prev_task_id",
        "current_task_id",
    },
    "run": {"tasks", "eval_batch_size", "max_new_tokens", "eval_max_rows", "eval_tasks", "general_windows"},
    "task": {"name", "scoring", "choices", "columns"},
    "method_options": {
        "ema_alpha",
        "consistency_weight",
        "ilora_consistency_target",
        "ilora_replay_loss",
        "selective_update",
        "min_update_threshold",
        "hidden_state_layers",
        "save_ema_adapter",
        "ema_adapter_path",
        "derpp_alpha",
        "derpp_beta",
        "derpp_top_k",
        "ewc_lambda",
        "ewc_gamma",
        "ewc_fisher_samples",
        "lwf_weight",
        "lwf_temperature",
        "olora_lambda1",
        "olora_lambda2",
        "nlora_lambda1",
        "inflora_threshold",
        "magmax_scaling",
    },
}


def test_every_setting_is_reviewed_as_guarded_or_unable_to_change_results():
    import dataclasses

    from transformers import TrainingArguments

    from ilora import methods
    from ilora.config.arguments import ContinualArguments, DataArguments, ModelArguments, RunArguments, TaskSpec
    from ilora.store.rundir import NOT_RESULTS

    classes = {
        "model": [ModelArguments],
        "data": [DataArguments],
        "continual": [ContinualArguments],
        "run": [RunArguments],
        "task": [TaskSpec],
        "method_options": [cls for cls in methods.argument_classes().values() if cls is not None],
    }
    for part, owners in classes.items():
        fields = {f.name for owner in owners for f in dataclasses.fields(owner)}
        unreviewed = fields - GUARDED_FIELDS[part] - NOT_RESULTS[part]
        assert not unreviewed, f"{part}: classify {sorted(unreviewed)} in GUARDED_FIELDS or rundir.NOT_RESULTS"
        assert not GUARDED_FIELDS[part] & NOT_RESULTS[part] and NOT_RESULTS[part] <= fields, part
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    stale = NOT_RESULTS["training"] - trainer_fields  # the Trainer's other fields are guarded by default
    assert not stale, f"no longer TrainingArguments fields: {sorted(stale)}"


def test_a_run_directory_moved_with_its_files_continues_without_retraining(world, tmp_path, monkeypatch):
    from ilora import ILoRATrainer

    argv = run_copy(world, tmp_path)  # another folder: every path differs, every content is the same
    monkeypatch.setattr(ILoRATrainer, "train", lambda *a, **k: pytest.fail("a finished task was retrained"))
    assert main(argv) == 0


@pytest.mark.parametrize(
    "marker, refusal",
    [
        (None, "not an ilora demo"),
        ({"full": False}, "damaged demo marker"),
        ({"full": False, "tasks": ["tweets"]}, "holds a demo of other tasks"),
    ],
)
def test_a_demo_directory_of_other_tasks_is_refused_untouched(tmp_path, marker, refusal):
    from ilora.pipeline import demo

    if marker is not None:
        (tmp_path / demo.DEMO_MARKER).write_text(json.dumps(marker))
    for name in ("data", "config.yaml", "seq_lora"):
        (tmp_path / name).mkdir() if name != "config.yaml" else (tmp_path / name).write_text("seed: 0\n")
    (tmp_path / "seq_lora" / "settings.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(ILoRAError, match=refusal):
        demo.run_demo(output_dir=tmp_path)
    assert snapshot(tmp_path) == before


def test_a_demo_directory_with_nothing_trained_is_reused(tmp_path, monkeypatch):
    from ilora.pipeline import demo

    (tmp_path / demo.DEMO_MARKER).write_text(json.dumps({"full": False}))
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    demo._check_same_tasks(tmp_path, False, demo.DEMO["tasks"])  # no error: no run has trained there
    (tmp_path / demo.DEMO_MARKER).write_text(json.dumps({"full": False, "tasks": demo.DEMO["tasks"]}))
    (tmp_path / "seq_lora").mkdir()
    demo._check_same_tasks(tmp_path, False, demo.DEMO["tasks"])  # the same tasks: continues
    with pytest.raises(ILoRAError, match="holds a demo of other tasks"):  # other tasks, now that a run has trained
        demo._check_same_tasks(tmp_path, False, ["tweets"])


# ----------------------------------------------------------- a full disk
NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _fail_after_writing_part(target_of, error):
    """A write that puts half a file where it writes, then fails as a full disk does."""

    def fail(*args, **kwargs):
        target = Path(target_of(*args, **kwargs))
        folder = target if target.suffix == "" else target.parent
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "half-written.bin").write_bytes(b"\0" * 64)
        raise error

    return fail


def full_disk_cases():
    from safetensors import SafetensorError

    return {
        "export --merge": (
            "transformers.PreTrainedModel.save_pretrained",
            lambda self, path, *a, **k: path,
            SafetensorError(NO_SPACE),
            lambda w, t: ["export", str(w["t1"]), "--output", str(t / "merged"), "--merge"],
        ),
        "a Trainer checkpoint": (
            "torch.save",
            lambda obj, f, *a, **k: f,
            RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
            lambda w, t: train(w, t, "--save_strategy", "steps", "--save_steps", "1"),
        ),
        "publishing a finished task": (
            "ilora.store.taskdir.save_adapter",
            lambda model, name, directory, *a, **k: directory,
            OSError(28, "No space left on device"),
            lambda w, t: train(w, t),
        ),
    }


@pytest.mark.parametrize("case", ["export --merge", "a Trainer checkpoint", "publishing a finished task"])
def test_a_full_disk_is_one_line_exit_1_and_the_retry_succeeds(case, world, tmp_path, capsys, monkeypatch):
    target, where, error, build = full_disk_cases()[case]
    argv = build(world, tmp_path)
    module, name = target.rsplit(".", 1)
    import importlib

    owner = (
        importlib.import_module(module)
        if module != "transformers.PreTrainedModel"
        else __import__("transformers").PreTrainedModel
    )
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, _fail_after_writing_part(where, error))
        capsys.readouterr()
        assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("{")]
    assert (
        len(lines) == 1
        and "could not write" in lines[0]
        and ("No space left" in lines[0] or "write failed" in lines[0])
    ), lines
    assert not any(p.name in ("ilora_task.json", "ilora_export.json") for p in tmp_path.rglob("*")), (
        "written as finished"
    )
    assert main(argv) == 0  # space is back: the same command succeeds, nothing left over blocks it
