import pytest
import torch
from helpers import PAD, TOKENIZER, arguments, assert_closed_form_ema, lora, peft_model
from peft import get_peft_model
from tiny import sentiment_rows, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from ilora import ILoRATrainer
from ilora.data.encode import PadCollator, encode_rows


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def examples(n=24):
    return encode_rows(sentiment_rows(n), TOKENIZER, cutoff_len=64, use_chat_template=False)


class RecordPlastic(TrainerCallback):
    """Snapshots of the plastic adapter right after each optimizer step (runs before ilora's EMA)."""

    def __init__(self):
        self.trainer = None
        self.snapshots = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.snapshots.append([t.detach().clone() for t in self.trainer.method.adapters.plastic])


def test_use_ilora_false_equals_plain_peft_lora_training(tmp_path):
    args = training_args(tmp_path)
    ilora = ILoRATrainer(
        model=tiny_llama(),
        args=args,
        **arguments(use_ilora=False),
        peft_config=lora(),
        train_dataset=examples(),
        processing_class=TOKENIZER,
    )
    ilora.train()

    base = tiny_llama()
    torch.manual_seed(args.seed)  # ILoRATrainer seeds before creating the LoRA weights; so does this
    plain_model = get_peft_model(base, lora())
    collate = PadCollator(PAD)
    plain = Trainer(
        model=plain_model,
        args=args,
        train_dataset=examples(),
        data_collator=lambda f: {k: v for k, v in collate(f).items() if k != "lengths"},
    )
    plain.train()

    def losses(trainer):
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    assert losses(ilora) == pytest.approx(losses(plain), rel=1e-5)
    assert len(losses(ilora)) == 6
    assert "stable" not in ilora.model.peft_config and ilora.method.buffer is None


def test_trainer_ema_runs_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    recorder = RecordPlastic()
    trainer = ILoRATrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=5),
        **arguments(ema_alpha=0.7, ilora_buffer_size=8),
        peft_config=lora(),
        train_dataset=examples(),
        processing_class=TOKENIZER,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    initial = [t.detach().clone() for t in trainer.method.adapters.stable]
    trainer.train()
    assert len(recorder.snapshots) == 5 and trainer.method.step == 5
    assert_closed_form_ema(trainer.method.adapters.stable, initial, recorder.snapshots, 0.7)


def test_optimizer_holds_exactly_the_plastic_adapter(tmp_path):
    trainer = ILoRATrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=1),
        peft_config=lora(),
        train_dataset=examples(8),
        processing_class=TOKENIZER,
    )
    trainer.create_optimizer()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(t) for t in trainer.method.adapters.plastic}


def test_raw_prompt_response_rows_are_tokenized_and_logs_carry_the_method_losses(tmp_path):
    trainer = ILoRATrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=3),
        **arguments(ilora_buffer_size=8),
        peft_config=lora(),
        train_dataset=sentiment_rows(12),
        processing_class=TOKENIZER,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("ce_loss" in e and "consistency_loss" in e for e in logs)
    assert logs[0]["consistency_loss"] == 0.0  # first step: empty buffer, nothing to replay
    assert logs[-1]["consistency_loss"] > 0.0


def test_a_given_peft_model_with_a_plastic_adapter_gets_its_stable_twin(tmp_path):
    model = peft_model(with_stable=False)
    trainer = ILoRATrainer(
        model=model, args=training_args(tmp_path), train_dataset=examples(8), processing_class=TOKENIZER
    )
    assert set(trainer.model.peft_config) == {"plastic", "stable"}
    for p, s in zip(trainer.method.adapters.plastic, trainer.method.adapters.stable):
        assert torch.equal(p, s)


def test_method_losses_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = ILoRATrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=4, report_to=["tensorboard"]),  # events under output_dir/runs
        **arguments(ilora_buffer_size=8, selective_update=True, min_update_threshold=1e6),
        peft_config=lora(),
        train_dataset=examples(16),
        processing_class=TOKENIZER,
    )
    trainer.train()
    [event_dir] = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(event_dir)).Reload().Tags()["scalars"]
    assert {"train/ce_loss", "train/consistency_loss", "train/ema_skipped", "train/loss"} <= set(scalars)
