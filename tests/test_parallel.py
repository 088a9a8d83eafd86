"""Multi-process training through torchrun (2 CPU processes, gloo): every rank keeps the same replay
buffer over every rank's rows, the adapters are identical on every rank, rank 0 writes and evaluates, and
2 processes at half the batch train what one process trains."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_peft_loads, failure
from safetensors.torch import load_file
from test_fsdp import ilora_run
from tiny import two_task_config

from ilora.runtime import distributed


def test_two_processes_keep_the_same_buffer_and_equal_adapters(ddp_run, tiny_model_dir):
    """The session's DDP run (test_fsdp's settings: 8 rows per task, 2 epochs, batch 2 per rank)."""
    for task in ("1-alpha", "2-beta"):
        directory = ddp_run / "ilora" / "tasks" / task
        manifest = json.loads((directory / "ilora_task.json").read_text())
        first, second = manifest["adapter_checksum_per_rank"]
        assert first == second, "the ranks' adapters differ"
        seen = manifest["buffer"]["num_seen_per_rank"]
        # 16 rows x 2 epochs per task, all of them offered to each rank's buffer
        assert manifest["buffer"]["ranks"] == 2 and seen == [32 * int(task[0])] * 2
        first, second = ((directory / "buffer" / f"rank-{rank}" / "buffer.safetensors").read_bytes() for rank in (0, 1))
        assert first == second, "the ranks' buffers differ"
        assert_peft_loads(tiny_model_dir, directory / "stable")
    metrics = json.loads((ddp_run / "ilora" / "metrics.json").read_text())
    assert len(metrics["matrices"]["stable"]) == 3  # rank 0 scored the base and both tasks


def invariance_config(tmp_path, model_dir, name, method, per_device_batch, **settings) -> Path:
    """16 rows per task, 2 epochs, a global batch of 4; no dropout (each rank would draw its own masks)."""
    settings = two_task_config(
        tmp_path,
        model_dir,
        method=method,
        per_device_train_batch_size=per_device_batch,
        seed=1,
        num_train_epochs=2,
        lora_dropout=0.0,
        bf16=False,
        output_dir=str(tmp_path / name),
        **settings,
    )
    if per_device_batch == 2:
        settings["ddp_backend"] = "gloo"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def task_adapters(run: Path, method: str, task: str) -> dict[str, dict[str, torch.Tensor]]:
    directory = run / method / "tasks" / task
    return {
        name: load_file(str(directory / name / "adapter_model.safetensors"))
        for name in ("plastic", "stable")
        if (directory / name).is_dir()
    }


# DER++ with the surprise policy: the stored logits and each row's loss are gathered with the rows
@pytest.mark.parametrize(
    ("method", "settings"), [("ilora", {}), ("er", {}), ("derpp", {"replay_policy": "surprise"})], ids=str
)
def test_two_processes_at_half_the_batch_train_what_one_process_trains(tiny_model_dir, tmp_path, method, settings):
    """1 process x batch 4 and 2 processes x batch 2: the same rows in each step, the same replay draws,
    losses averaged over the global batch; the adapters of both tasks agree to float tolerance, and
    so do the accuracies."""
    two = ilora_run(invariance_config(tmp_path, tiny_model_dir, "two", method, 2, **settings))
    assert two.returncode == 0, failure(two)
    one_config = invariance_config(tmp_path, tiny_model_dir, "one", method, 4, **settings)
    one = subprocess.run(
        [sys.executable, "-m", "ilora.cli", "run", str(one_config)], capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, failure(one)
    for task in ("1-alpha", "2-beta"):
        one_adapters = task_adapters(tmp_path / "one", method, task)
        two_adapters = task_adapters(tmp_path / "two", method, task)
        assert one_adapters.keys() == two_adapters.keys() and one_adapters
        for name, tensors in one_adapters.items():
            for key, tensor in tensors.items():
                gap = (tensor - two_adapters[name][key]).abs().max()
                scale = tensor.abs().max()
                assert gap <= 1e-6 + 1e-4 * scale, f"{task} {name} {key}: differs by {gap:.2e} (size {scale:.2e})"
    one_metrics, two_metrics = (
        json.loads((tmp_path / run / method / "metrics.json").read_text()) for run in ("one", "two")
    )
    assert one_metrics["matrices"] == two_metrics["matrices"]


def test_each_rank_trains_a_contiguous_share_of_the_global_replay_draw():
    """Concatenated in rank order, the shares are the draw one process would train on; a draw smaller than
    the number of ranks gives every rank one row (round-robin), never none."""
    for size, ranks in ((8, 2), (5, 2), (7, 3), (4, 4)):
        draw = list(range(size))
        shares = [distributed.share_of(draw, ranks, r) for r in range(ranks)]
        assert [row for share in shares for row in share] == draw
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [distributed.share_of([10, 11, 12], 4, r) for r in range(4)] == [[10], [11], [12], [10]]
    assert distributed.share_of([], 2, 1) == [] and distributed.share_of([1, 2], 1, 0) == [1, 2]
