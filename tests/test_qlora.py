"""QLoRA: the base in 4 bits through bitsandbytes (on the CPU here), the adapters in full precision."""

import json

import pytest
import torch
from helpers import arguments, assert_closed_form_ema
from peft import PeftModel
from test_trainer import RecordPlastic, examples, lora
from tiny import save_tiny_model, sentiment_rows, write_jsonl
from transformers import TrainingArguments

from ilora import ILoRATrainer
from ilora.cli import main
from ilora.runtime.loader import load_model_and_tokenizer

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (make test installs it)")
FOUR_BIT = {"bits": 4, "type": "nf4", "double": True}
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
    "--bf16",
    "false",
    "--max_steps",
    "3",
    "--learning_rate",
    "0.01",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Hidden size 64: bitsandbytes' CPU inference path packs 4-bit rows in blocks of 64 inputs."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-64"), hidden_size=64)


def train(model_dir, tmp_path, name, *extra):
    data = write_jsonl(tmp_path / f"{name}.jsonl", sentiment_rows(12, offset=len(name)))
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / name),
        "--current_task_id",
        name,
        *COMMON,
        *extra,
    ]
    return main(argv)


def test_a_two_task_chain_on_a_4bit_base_trains_records_and_loads(model_dir, tmp_path, capsys):
    assert train(model_dir, tmp_path, "t1", "--quantization_bit", "4") == 0
    assert (
        train(model_dir, tmp_path, "t2", "--quantization_bit", "4", "--previous_task_model", str(tmp_path / "t1")) == 0
    )
    manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
    assert manifest["quantization"] == FOUR_BIT and manifest["prev_task_id"] == "t1"
    base, _ = load_model_and_tokenizer(str(model_dir), quantization=FOUR_BIT)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = PeftModel.from_pretrained(base, tmp_path / "t2" / "stable")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # adapters full precision
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()
    # a chained task must load the base the same way
    capsys.readouterr()
    assert train(model_dir, tmp_path, "t3", "--previous_task_model", str(tmp_path / "t2")) == 2
    assert "trained on a base loaded as 4-bit nf4; this task loads it as full precision" in capsys.readouterr().err


def test_on_a_4bit_base_the_stable_adapter_is_the_closed_form_ema(model_dir, tmp_path):
    base, tokenizer = load_model_and_tokenizer(str(model_dir), quantization=FOUR_BIT)
    recorder = RecordPlastic()
    trainer = ILoRATrainer(
        model=base,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            learning_rate=0.05,
            max_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=1,
            disable_tqdm=True,
        ),
        **arguments(ema_alpha=0.6, ilora_buffer_size=8),
        peft_config=lora(),
        train_dataset=examples(),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    initial = [t.detach().clone() for t in trainer.method.adapters.stable]
    trainer.train()
    assert_closed_form_ema(trainer.method.adapters.stable, initial, recorder.snapshots, 0.6)


def test_quantization_settings_and_a_missing_bitsandbytes_are_one_line_errors(model_dir, tmp_path, capsys, monkeypatch):
    assert train(model_dir, tmp_path, "t1", "--quantization_bit", "3") == 2
    assert "quantization_bit=3 must be 4 or 8" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert train(model_dir, tmp_path, "t1", "--quantization_bit", "4") == 2
    assert "pip install 'ilora[qlora]'" in capsys.readouterr().err
    assert not (tmp_path / "t1").exists()
