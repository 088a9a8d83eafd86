"""Multi-process training: refused at start-up until the replay buffer is kept per rank."""

import subprocess
import sys
from pathlib import Path

from tiny import sentiment_rows, write_jsonl


def test_multi_process_training_is_refused_until_per_rank_buffers_exist(tiny_model_dir, tmp_path):
    """Two gloo processes on the CPU: refused at start-up, nothing written (never a silent non-I-LoRA run)."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "ilora.cli", "train",
         "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "o"),
         "--lora_target", "q_proj,v_proj", "--max_steps", "2", "--report_to", "none", "--use_cpu", "true",
         "--ddp_backend", "gloo"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("multi-process training (2 processes) is not supported yet") == 2
    assert not (tmp_path / "o" / "ilora_task.json").exists()
