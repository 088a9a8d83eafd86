"""Nothing the project reads is unpickled: crafted pickle files are refused and their payload never runs."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from tiny import sentiment_rows, write_jsonl

from ilora import ILoRAError, ReplayBuffer
from ilora.cli import main
from ilora.config.arguments import ModelArguments
from ilora.config.parse import parse_train_args


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_a_pickle_posing_as_the_replay_buffer_is_refused(tmp_path):
    ReplayBuffer(4).save(tmp_path)
    marker = tmp_path / "pwned"
    crafted(tmp_path / "buffer.safetensors", marker)
    with pytest.raises(ILoRAError, match="unreadable"):
        ReplayBuffer.load(tmp_path)
    assert not marker.exists()


def test_a_pickle_in_a_checkpoint_is_refused_on_resume(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
        "--lora_target",
        "q_proj,v_proj",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    assert main(args) == 0
    marker = tmp_path / "pwned"
    crafted(tmp_path / "o" / "checkpoint-1" / "optimizer.pt", marker)
    (tmp_path / "o" / "ilora_task.json").unlink()  # unfinished: its adapters are leftovers ilora may replace
    assert (
        main(
            args + ["--resume_from_checkpoint", str(tmp_path / "o" / "checkpoint-1"), "--overwrite_output_dir", "true"]
        )
        == 2
    )
    assert "a file holds objects other than tensors" in capsys.readouterr().err
    assert not marker.exists()


def test_a_pickled_rng_state_in_a_checkpoint_is_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
        "--lora_target",
        "q_proj,v_proj",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    assert main(args) == 0
    marker = tmp_path / "pwned"
    crafted(tmp_path / "o" / "checkpoint-1" / "rng_state.pth", marker)
    (tmp_path / "o" / "ilora_task.json").unlink()
    capsys.readouterr()
    assert (
        main(
            args + ["--resume_from_checkpoint", str(tmp_path / "o" / "checkpoint-1"), "--overwrite_output_dir", "true"]
        )
        == 2
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ilora")]
    assert len(lines) == 1 and "checkpoint-1: a file holds objects other than tensors" in lines[0]
    assert not marker.exists()


def test_the_source_never_unpickles():
    source = Path(__file__).parents[1] / "src" / "ilora"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_remote_code_is_off_unless_the_user_sets_it():
    assert ModelArguments().trust_remote_code is False
    assert parse_train_args(["--trust_remote_code", "true"]).model.trust_remote_code is True


def test_a_method_state_holding_nan_is_one_line(tmp_path):
    """Every route that reads a method's state (chaining, resume) reads it through one function."""
    from safetensors.torch import save_file

    from ilora.store.state import METHOD_STATE, read_method_state

    save_file({"fisher.0": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])}, str(tmp_path / METHOD_STATE))
    with pytest.raises(ILoRAError, match=r"method_state.safetensors: 'fisher.0' holds NaN or inf"):
        read_method_state(tmp_path, {"tensors": 1})
