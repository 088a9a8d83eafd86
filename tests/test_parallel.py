"""Multi-process training through torchrun (2 CPU processes, gloo): per-rank replay buffers, identical
stable adapters on every rank, rank 0 writes and evaluates, the loss close to one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from tiny import two_task_config
from transformers import AutoModelForCausalLM


def config(tmp_path, model_dir, name, per_device_batch):
    settings = two_task_config(
        tmp_path,
        model_dir,
        per_device_train_batch_size=per_device_batch,
        seed=1,
        num_train_epochs=2,
        output_dir=str(tmp_path / name),
        selective_update=True,
        min_update_threshold=0.0,
    )
    if per_device_batch == 2:
        settings["ddp_backend"] = "gloo"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_two_processes_train_a_two_task_sequence(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "ilora.cli",
            "run",
            str(config(tmp_path, tiny_model_dir, "two", per_device_batch=2)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "ilora.cli", "run", str(config(tmp_path, tiny_model_dir, "one", per_device_batch=4))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    for task in ("1-alpha", "2-beta"):
        directory = tmp_path / "two" / "ilora" / "tasks" / task
        manifest = json.loads((directory / "ilora_task.json").read_text())
        first, second = manifest["stable_checksum_per_rank"]
        assert first == second, "the ranks' stable adapters differ"
        assert (
            manifest["buffer"]["ranks"] == 2 and manifest["buffer"]["num_seen_per_rank"] == [16 * int(task[0])] * 2
        )  # 8 rows x 2 epochs per task
        assert (directory / "buffer" / "rank-0" / "buffer.safetensors").is_file()
        assert (directory / "buffer" / "rank-1" / "buffer.safetensors").is_file()
        single = json.loads((tmp_path / "one" / "ilora" / "tasks" / task / "ilora_task.json").read_text())
        # same global batch (2 x 2 vs 4): the data order and replay rows differ, the loss stays close
        assert manifest["final_losses"]["train_loss"] == pytest.approx(single["final_losses"]["train_loss"], rel=0.05)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert isinstance(PeftModel.from_pretrained(base, directory / "stable"), PeftModel)
    metrics = json.loads((tmp_path / "two" / "ilora" / "metrics.json").read_text())
    assert len(metrics["matrices"]["stable"]) == 3
