"""Crash and resume: SIGKILL a real `ilora` process at chosen points, resume, and compare bitwise with
an uninterrupted run of the same seed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_methods_contract import CASES
from tiny import sentiment_rows, two_task_config, write_jsonl

KILLER = Path(__file__).parent / "killer.py"

TRAIN_FLAGS = [
    "--lora_target",
    "q_proj,v_proj",
    "--lora_rank",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--report_to",
    "none",
    "--ilora_buffer_size",
    "6",
    "--save_steps",
    "2",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--ema_alpha",
    "0.8",
    "--max_steps",
    "8",
    "--learning_rate",
    "0.01",
    "--seed",
    "3",
]


def run_cli(args, kill=None):
    argv = [sys.executable, str(KILLER), *(kill or ("none", "0")), *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def assert_same_task(a: Path, b: Path):
    for name in ("plastic", "stable"):
        left, right = (
            load_file(str(a / name / "adapter_model.safetensors")),
            load_file(str(b / name / "adapter_model.safetensors")),
        )
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name} {key} differs"
    bl, br = load_file(str(a / "buffer" / "buffer.safetensors")), load_file(str(b / "buffer" / "buffer.safetensors"))
    assert all(torch.equal(bl[k], br[k]) for k in bl)
    assert json.loads((a / "buffer" / "buffer.json").read_text()) == json.loads(
        (b / "buffer" / "buffer.json").read_text()
    )
    ma, mb = (json.loads((d / "ilora_task.json").read_text()) for d in (a, b))
    assert ma["sequence_steps"] == mb["sequence_steps"] and ma["global_steps"] == mb["global_steps"]
    # the whole task's mean loss, not only the steps after the resume
    assert ma["final_losses"]["train_loss"] == pytest.approx(mb["final_losses"]["train_loss"], rel=1e-6)
    # and the whole task's replayed rows and trained parameters (cost columns of the benchmark tables)
    assert ma["rows_replayed"] == mb["rows_replayed"] > 0
    assert ma["trainable_parameters"] == mb["trainable_parameters"] > 0


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "t.jsonl", sentiment_rows(32))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "t1"
    result = run_cli(
        ["train", "--model", str(tiny_model_dir), "--dataset", str(task_data), "--output_dir", str(out), *TRAIN_FLAGS]
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("kill", [("step", "5"), ("checkpoint", "6")], ids=["mid-task", "while-checkpointing"])
def test_killed_task_resumes_bitwise_identical(kill, reference, tiny_model_dir, task_data, tmp_path):
    out = tmp_path / "t1"
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(task_data),
        "--output_dir",
        str(out),
        *TRAIN_FLAGS,
    ]
    killed = run_cli(args, kill)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "ilora_task.json").exists()
    if kill[0] == "checkpoint":
        assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-6" / "ilora_checkpoint.json").exists()
    resumed = run_cli(args + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_task(reference, out)


def test_resume_refuses_an_incomplete_checkpoint(reference, tiny_model_dir, task_data, tmp_path):
    out = tmp_path / "t1"
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(task_data),
        "--output_dir",
        str(out),
        *TRAIN_FLAGS,
    ]
    assert run_cli(args, ("checkpoint", "2")).returncode == -signal.SIGKILL
    result = run_cli(args + ["--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert result.returncode == 2 and "not a complete ilora checkpoint" in result.stderr


def test_killed_sequence_continues_and_matches_an_uninterrupted_one(tiny_model_dir, tmp_path):
    settings = two_task_config(tmp_path, tiny_model_dir, save_steps=1, seed=5)
    runs = {}
    for label, kills in (("clean", []), ("killed", [("task", "1"), ("step", "2")])):
        config = tmp_path / f"{label}.yaml"
        config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / label)}))
        for kill in kills:  # between tasks, then in the middle of task 2
            assert run_cli(["run", str(config)], kill).returncode == -signal.SIGKILL
        result = run_cli(["run", str(config)])
        assert result.returncode == 0, result.stderr
        runs[label] = tmp_path / label / "ilora"
    clean, killed = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("clean", "killed"))
    assert clean["matrices"] == killed["matrices"]
    for task in ("1-alpha", "2-beta"):
        assert_same_task(runs["clean"] / "tasks" / task, runs["killed"] / "tasks" / task)


def assert_same_outputs(a: Path, b: Path):
    """Every adapter a task lists, its buffer and its method state: bitwise equal."""
    adapters = json.loads((a / "ilora_task.json").read_text())["adapters"]
    assert adapters == json.loads((b / "ilora_task.json").read_text())["adapters"]
    files = [f"{path}/adapter_model.safetensors" for path in adapters.values()]
    files += [f for f in ("buffer/buffer.safetensors", "method_state.safetensors") if (a / f).exists()]
    for name in files:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), f"{name} differs"


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.full) for m in CASES if m not in ("ilora", "joint")]
)
def test_a_method_killed_mid_task_resumes_bitwise_identical(method, tiny_model_dir, tmp_path):
    """The state each method adds (EWC's Fisher, LwF's teacher, DER++'s stored logits, O-LoRA's frozen
    LoRAs) survives a real SIGKILL between tasks and in the middle of the second task (I-LoRA: above;
    joint training has one stage). Every method's resume from a checkpoint is in the contract table."""
    settings = two_task_config(
        tmp_path, tiny_model_dir, save_steps=1, seed=5, method=method, max_steps=3, ewc_fisher_samples=4, derpp_top_k=8
    )
    for label, kill in (("clean", None), ("killed", ("step", "2"))):
        config = tmp_path / f"{label}.yaml"
        config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / label)}))
        if kill:
            assert run_cli(["run", str(config)], ("task", "1")).returncode == -signal.SIGKILL
            assert run_cli(["run", str(config)], kill).returncode == -signal.SIGKILL
        result = run_cli(["run", str(config)])
        assert result.returncode == 0, result.stderr
    for task in ("1-alpha", "2-beta"):
        assert_same_outputs(tmp_path / "clean" / method / "tasks" / task, tmp_path / "killed" / method / "tasks" / task)
