import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import sentiment_rows, write_jsonl
from transformers import AutoModelForCausalLM

from ilora.cli import main
from ilora.core.buffer import ReplayBuffer
from ilora.methods.ilora import ema_coefficient

COMMON = [
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
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--ema_alpha",
    "0.9",
]


def adapter(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), *COMMON, *extra])


@pytest.fixture
def task1(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t1.jsonl", sentiment_rows(16))
    assert train(tiny_model_dir, data, tmp_path / "t1", "--current_task_id", "t1", "--max_steps", "4") == 0
    return tmp_path / "t1"


def test_a_task_directory_holds_loadable_adapters_buffer_and_manifest(task1, tiny_model_dir):
    manifest = json.loads((task1 / "ilora_task.json").read_text())
    assert manifest["task_id"] == "t1" and manifest["sequence_steps"] == 4
    assert manifest["lora"]["r"] == 4
    sizes = manifest["buffer"].pop("bytes_per_row")
    assert manifest["buffer"] == {
        "size": 6,
        "policy": "reservoir",
        "budget": {"capacity": 6, "unit": "rows", "used": 6},
        "num_seen": 16,
        "ranks": 1,
        "num_seen_per_rank": [16],
    }
    assert sizes["tokens"] > 0 and sizes["extras"] == 0  # I-LoRA keeps token ids and labels, nothing else
    assert len(manifest["adapter_checksum_per_rank"]) == 1
    assert {"ce_loss", "consistency_loss", "train_loss"} <= manifest["final_losses"].keys()
    for name in ("plastic", "stable"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), task1 / name)
        assert model.peft_config["default"].r == 4
    assert adapter(task1 / "plastic").keys() == adapter(task1 / "stable").keys()
    assert not any(p.name.startswith(".") for p in task1.iterdir()), "staging left behind"


def test_second_task_starts_from_first_tasks_plastic_stable_and_buffer(task1, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t2.jsonl", sentiment_rows(8, offset=50))
    # learning rate 0: the plastic adapter cannot move, so task 2's adapters show exactly where it started
    code = train(
        tiny_model_dir,
        data,
        tmp_path / "t2",
        "--current_task_id",
        "t2",
        "--previous_task_model",
        str(task1),
        "--prev_task_id",
        "t1",
        "--learning_rate",
        "0",
        "--max_steps",
        "3",
    )
    assert code == 0
    plastic1, stable1 = adapter(task1 / "plastic"), adapter(task1 / "stable")
    plastic2, stable2 = adapter(tmp_path / "t2" / "plastic"), adapter(tmp_path / "t2" / "stable")
    for key in plastic1:
        assert torch.equal(plastic1[key], plastic2[key])
    # the EMA step count continues from task 1 (t = 5, 6, 7), with the plastic adapter fixed
    keep = 1.0
    for t in (5, 6, 7):
        keep *= ema_coefficient(t, 0.9)
    for key in stable1:
        expected = plastic1[key] + keep * (stable1[key] - plastic1[key])
        torch.testing.assert_close(stable2[key], expected, atol=1e-6, rtol=0)
    assert any(not torch.equal(stable1[k], stable2[k]) for k in stable1)
    manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
    assert manifest["prev_task_id"] == "t1" and manifest["sequence_steps"] == 7
    buffer = ReplayBuffer.load(tmp_path / "t2" / "buffer")
    assert buffer.num_seen == 16 + 12 and len(buffer) == 6


def test_yaml_config_trains_like_flags(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: {data}\noutput_dir: {tmp_path / 'y'}\n"
        "lora_target: q_proj,v_proj\nmax_steps: 2\nreport_to: none\nuse_cpu: true\n"
        "hidden_state_layers: [1, -1]\ncurrent_task_id: y1\n"
    )
    assert main(["train", str(config)]) == 0
    manifest = json.loads((tmp_path / "y" / "ilora_task.json").read_text())
    assert manifest["method_options"]["hidden_state_layers"] == [1, -1] and manifest["task_id"] == "y1"


def test_finished_output_dir_is_not_overwritten_without_the_flag(task1, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(4))
    before = (task1 / "ilora_task.json").read_text()
    assert train(tiny_model_dir, data, task1) == 2
    assert "already holds a finished task" in capsys.readouterr().err
    assert (task1 / "ilora_task.json").read_text() == before
    assert train(tiny_model_dir, data, task1, "--overwrite_output_dir", "--max_steps", "1") == 0


def test_a_write_error_is_one_line_and_leaves_no_finished_task(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import ilora.store.taskdir as taskdir

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(taskdir, "save_adapter", disk_full)
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(4))
    assert train(tiny_model_dir, data, tmp_path / "o", "--max_steps", "1") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"could not write {tmp_path / 'o'}" in err
    assert not (tmp_path / "o" / "ilora_task.json").exists()


def test_an_easycl_config_with_its_twelve_parameter_names_trains_two_chained_tasks(tiny_model_dir, tmp_path):
    """EasyCL's I-LoRA module documents twelve parameters; a config written for it runs unchanged."""
    import yaml

    write_jsonl(tmp_path / "t1.jsonl", sentiment_rows(8))
    write_jsonl(tmp_path / "t2.jsonl", sentiment_rows(8, offset=50))
    common = {
        "model_name_or_path": str(tiny_model_dir),
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "max_steps": 3,
        "use_cpu": True,
        "report_to": "none",
        "use_ilora": True,
        "ema_alpha": 0.9,
        "consistency_weight": 0.5,
        "ilora_buffer_size": 6,
        "selective_update": True,
        "min_update_threshold": 0.0,
        "hidden_state_layers": [-1],
        "save_ema_adapter": True,
    }
    first = {**common, "dataset": "t1.jsonl", "output_dir": "t1", "current_task_id": "t1", "ema_adapter_path": "ema/t1"}
    second = {
        **common,
        "dataset": "t2.jsonl",
        "output_dir": "t2",
        "current_task_id": "t2",
        "previous_task_model": "t1",
        "prev_task_id": "t1",
        "ema_adapter_path": "ema/t1",  # for a chained task: where the previous stable adapter is read
    }
    for name, config in (("first", first), ("second", second)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0, name
    manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
    assert manifest["method"] == "ilora" and manifest["prev_task_id"] == "t1"
    assert manifest["method_options"]["consistency_weight"] == 0.5 and manifest["sequence_steps"] == 6
    assert (tmp_path / "ema" / "t1" / "adapter_config.json").is_file()  # task 1's stable adapter where it was asked
    assert (tmp_path / "t2" / "stable" / "adapter_config.json").is_file()  # task 2's in its own directory
