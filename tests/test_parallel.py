"""Multi-process training through torchrun (2 CPU processes, gloo): per-rank replay buffers, identical
adapters on every rank, rank 0 writes and evaluates, the loss close to one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import assert_peft_loads, failure
from tiny import two_task_config


def test_two_processes_keep_a_buffer_each_and_equal_adapters(ddp_run, tiny_model_dir):
    """The session's DDP run (test_fsdp's settings: 8 rows per task, 2 epochs, batch 2 per rank)."""
    for task in ("1-alpha", "2-beta"):
        directory = ddp_run / "ilora" / "tasks" / task
        manifest = json.loads((directory / "ilora_task.json").read_text())
        first, second = manifest["adapter_checksum_per_rank"]
        assert first == second, "the ranks' adapters differ"
        seen = manifest["buffer"]["num_seen_per_rank"]
        assert manifest["buffer"]["ranks"] == 2 and seen == [16 * int(task[0])] * 2  # 8 rows x 2 epochs per task
        for rank in (0, 1):
            assert (directory / "buffer" / f"rank-{rank}" / "buffer.safetensors").is_file()
        assert_peft_loads(tiny_model_dir, directory / "stable")
    metrics = json.loads((ddp_run / "ilora" / "metrics.json").read_text())
    assert len(metrics["matrices"]["stable"]) == 3  # rank 0 scored the base and both tasks


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


@pytest.mark.full
def test_two_processes_reach_the_loss_of_one_at_the_same_global_batch(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    two_config = str(config(tmp_path, tiny_model_dir, "two", per_device_batch=2))
    two = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "ilora.cli", "run", two_config],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, failure(two)
    one_config = str(config(tmp_path, tiny_model_dir, "one", per_device_batch=4))
    one = subprocess.run(
        [sys.executable, "-m", "ilora.cli", "run", one_config], capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, failure(one)
    for task in ("1-alpha", "2-beta"):
        two_task, one_task = (
            json.loads((tmp_path / run / "ilora" / "tasks" / task / "ilora_task.json").read_text())
            for run in ("two", "one")
        )
        # same global batch (2 x 2 vs 4): the data order and replay rows differ, the loss stays close
        loss = one_task["final_losses"]["train_loss"]
        assert two_task["final_losses"]["train_loss"] == pytest.approx(loss, rel=0.05)
