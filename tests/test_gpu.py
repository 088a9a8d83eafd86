"""The CUDA paths, run where a GPU is (skipped elsewhere, visibly): a two-task chain in bf16, the
closed-form EMA and selective update on the device, and kill-and-resume, bitwise."""

import json
import signal

import pytest
import torch
import yaml
from helpers import batches, method, peft_model, train
from test_resume import TRAIN_FLAGS, assert_same_task, run_cli
from tiny import sentiment_rows, two_task_config, write_jsonl

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def on_gpu(data: list[dict]) -> list[dict]:
    return [{k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in data]


def test_stable_adapter_equals_closed_form_ema_on_the_gpu():
    ilora = method(model=peft_model().to(CUDA), ema_alpha=0.9)
    initial = [t.detach().double().clone() for t in ilora.adapters.stable]
    trajectory = []
    train(ilora, on_gpu(batches(5)), record=trajectory)
    expected = initial
    for step, plastic in enumerate(trajectory, start=1):
        a = min(1 - 1 / (step + 1), 0.9)
        expected = [a * s + (1 - a) * p.double() for s, p in zip(expected, plastic)]
    for got, want in zip(ilora.adapters.stable, expected):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_selective_update_decides_on_the_gpu():
    ilora = method(model=peft_model().to(CUDA), selective_update=True, min_update_threshold=1e6)
    initial = [t.detach().clone() for t in ilora.adapters.stable]
    train(ilora, on_gpu(batches(3)))
    assert all(torch.equal(s, i) for s, i in zip(ilora.adapters.stable, initial))
    assert ilora.pop_logs()["ema_skipped"] == 1.0


def test_two_task_chain_in_bf16_on_the_gpu(tiny_model_dir, tmp_path):
    settings = two_task_config(
        tmp_path, tiny_model_dir, use_cpu=False, bf16=True, max_steps=3, output_dir=str(tmp_path / "runs")
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    result = run_cli(["run", str(tmp_path / "config.yaml")])
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs" / "ilora" / "tasks" / "2-beta" / "ilora_task.json").read_text())
    assert manifest["hardware"]["device"] == "cuda" and manifest["hardware"]["precision"] == "bf16"
    assert manifest["prev_task_id"] == "alpha" and manifest["sequence_steps"] == 6
    summary = json.loads((tmp_path / "runs" / "ilora" / "metrics.json").read_text())
    assert summary["hardware"]["device"] == "cuda" and summary["hardware"]["precision"] == "bf16"


def test_killed_task_resumes_bitwise_on_the_gpu(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(32))
    # the CPU-run flags without `--use_cpu true`
    flags = [v for i, v in enumerate(TRAIN_FLAGS) if "--use_cpu" not in (v, TRAIN_FLAGS[i - 1] if i else None)]

    def args(out):
        return ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out), *flags]

    reference = run_cli(args(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    killed = run_cli(args(tmp_path / "t1"), ("step", "5"))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(args(tmp_path / "t1") + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_task(tmp_path / "ref", tmp_path / "t1")
