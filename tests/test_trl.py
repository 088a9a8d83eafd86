"""ilora's methods inside TRL's SFTTrainer, with TRL's own dataset handling: two chained tasks on the tiny
model, the stable adapter against the closed-form EMA, and the task directories that `ilora train`
writes (chained, evaluated and exported by ilora's commands)."""

import json

import pytest
from helpers import TOKENIZER, assert_closed_form_ema, lora
from test_trainer import RecordPlastic
from tiny import sentiment_rows, write_jsonl

from ilora import ContinualArguments, ILoRAArguments
from ilora.cli import main

pytest.importorskip("trl")


def completions(n: int, offset: int = 0):
    from datasets import Dataset

    rows = sentiment_rows(n, offset=offset)
    return Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows])


def sft_trainer(model_dir, tmp_path, name: str, previous=None, callbacks=()):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from ilora.integrations.trl import ILoRASFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        max_steps=4,
        max_length=64,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        logging_steps=2,
    )
    continual = ContinualArguments(
        ilora_buffer_size=8,
        current_task_id=name,
        previous_task_model=str(previous) if previous else None,
    )
    return ILoRASFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        continual_args=continual,
        method_options=ILoRAArguments(ema_alpha=0.6),
        peft_config=lora(),
        train_dataset=completions(16, offset=100 * len(name)),
        processing_class=TOKENIZER,
        callbacks=list(callbacks),
    )


def test_two_chained_tasks_under_trl_keep_the_closed_form_ema_and_write_ilora_task_directories(
    tiny_model_dir, tmp_path
):
    recorder = RecordPlastic()
    first = sft_trainer(tiny_model_dir, tmp_path, "t1", callbacks=[recorder])
    recorder.trainer = first
    initial = [t.detach().clone() for t in first.method.adapters.stable]
    first.train()
    assert len(recorder.snapshots) == 4 and first.method.step == 4
    assert_closed_form_ema(first.method.adapters.stable, initial, recorder.snapshots, 0.6)
    logs = [e for e in first.state.log_history if "loss" in e]
    assert logs and all("consistency_loss" in e and "ce_loss" in e for e in logs)  # the method's terms, via TRL
    first.save_task(tmp_path / "t1")

    second = sft_trainer(tiny_model_dir, tmp_path, "t2", previous=tmp_path / "t1")
    second.train()
    second.save_task(tmp_path / "t2")
    manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
    assert manifest["method"] == "ilora" and manifest["prev_task_id"] == "t1" and manifest["sequence_steps"] == 8
    assert manifest["buffer"]["num_seen"] == 32  # both tasks' rows went through the reservoir


def test_a_task_trained_under_trl_is_chained_evaluated_and_exported_by_ilora(tmp_path, tiny_model_dir, capsys):
    trainer = sft_trainer(tiny_model_dir, tmp_path, "t1")
    trainer.train()
    trainer.save_task(tmp_path / "t1")
    data = write_jsonl(tmp_path / "t2.jsonl", sentiment_rows(8, offset=300))
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "t2")]
    argv += ["--previous_task_model", str(tmp_path / "t1"), "--lora_target", "q_proj,v_proj", "--lora_rank", "4"]
    argv += [
        "--lora_alpha",
        "8",
        "--ilora_buffer_size",
        "8",
        "--max_steps",
        "2",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
    ]
    assert main(argv + ["--ema_alpha", "0.6"]) == 0, capsys.readouterr().err
    config = tmp_path / "tasks.json"
    write_jsonl(tmp_path / "test.jsonl", sentiment_rows(4, offset=500))
    task = {"name": "t", "train": "test.jsonl", "test": "test.jsonl", "choices": ["positive", "negative"]}
    config.write_text(json.dumps({"tasks": [task], "use_cpu": True}))
    capsys.readouterr()
    assert (
        main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "t1"), "--tasks", str(config)]) == 0
    )
    assert set(json.loads(capsys.readouterr().out)) == {"plastic", "stable"}
    assert main(["export", str(tmp_path / "t1"), "--output", str(tmp_path / "exported")]) == 0
