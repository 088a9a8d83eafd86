"""A run that starts from an adapter trained elsewhere (`start_from`), with or without the rows it was
trained on (the replay buffer) and its test rows (its own column in the accuracy matrix)."""

import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny import sentiment_rows, two_task_config, write_jsonl
from transformers import AutoModelForCausalLM

from ilora.cli import main


@pytest.fixture
def elsewhere(tiny_model_dir, tmp_path):
    """A LoRA adapter written by plain PEFT, as another tool would (r 4, alpha 8, q and v)."""
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    model.save_pretrained(tmp_path / "elsewhere")
    return tmp_path / "elsewhere"


def run_config(tmp_path, model_dir, **settings):
    settings = {"start_from": "elsewhere", **settings}
    values = two_task_config(tmp_path, model_dir, max_steps=2, output_dir=str(tmp_path / "out"), **settings)
    for key in ("lora_rank", "lora_target"):  # the run takes the adapter's
        if key not in settings:
            values.pop(key)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_run_starts_from_an_adapter_as_the_model_before_its_first_task(elsewhere, tiny_model_dir, tmp_path):
    assert main(["run", str(run_config(tmp_path, tiny_model_dir))]) == 0
    run = tmp_path / "out" / "ilora"
    start = run / "tasks" / "0-start"
    given = load_file(str(elsewhere / "adapter_model.safetensors"))
    for adapter in ("plastic", "stable"):  # the start task is the adapter, untrained
        saved = load_file(str(start / adapter / "adapter_model.safetensors"))
        assert saved.keys() == given.keys() and all(torch.equal(saved[k], given[k]) for k in given)
    first = json.loads((run / "tasks" / "1-alpha" / "ilora_task.json").read_text())
    assert first["prev_task_id"] == "start" and first["lora"]["r"] == 4
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["tasks"] == ["alpha", "beta"] and len(summary["matrices"]["plastic"]) == 3
    base_row = json.loads((tmp_path / "out" / "base_eval.json").read_text())
    assert base_row["key"]["start_from"] is not None  # row 0: the adapter's model, not the bare base


def test_with_its_data_and_test_rows_the_start_task_opens_the_matrix_and_seeds_the_buffer(
    elsewhere, tiny_model_dir, tmp_path
):
    write_jsonl(tmp_path / "old.train.jsonl", sentiment_rows(5, offset=900))
    rows = [{**r, "choices": ["positive", "negative"]} for r in sentiment_rows(4, offset=950)]
    write_jsonl(tmp_path / "old.test.jsonl", rows)
    config = run_config(
        tmp_path, tiny_model_dir, start_from_data="old.train.jsonl", start_from_test="old.test.jsonl", method="derpp"
    )
    assert main(["run", str(config)]) == 0
    run = tmp_path / "out" / "derpp"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["tasks"] == ["start", "alpha", "beta"] and len(summary["matrices"]["plastic"]) == 4
    assert summary["metrics"]["plastic"]["BWT"] is not None  # the start task's forgetting counts
    start = json.loads((run / "tasks" / "1-start" / "ilora_task.json").read_text())
    assert start["buffer"]["num_seen"] == 5 and start["global_steps"] == 0
    buffer = load_file(str(run / "tasks" / "1-start" / "buffer" / "buffer.safetensors"))
    assert "extra.logit_values" in buffer  # DER++ keeps each seeded row with the start model's logits


def test_start_from_settings_that_cannot_be_honoured_are_one_line(elsewhere, tiny_model_dir, tmp_path, capsys):
    config = run_config(tmp_path, tiny_model_dir, start_from="elsewhere", lora_rank=8)
    assert main(["run", str(config)]) == 2
    assert "lora_rank=8 but start_from" in capsys.readouterr().err
    config = run_config(tmp_path, tiny_model_dir, start_from=None, start_from_test="elsewhere")
    assert main(["run", str(config)]) == 2
    assert "start_from_test goes with start_from" in capsys.readouterr().err
    config = run_config(tmp_path, tiny_model_dir, start_from="run.yaml")
    assert main(["run", str(config)]) == 2
    assert "not a PEFT LoRA adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
