"""Gradient checkpointing with I-LoRA's two passes: the plastic pass recomputes its activations in the
backward, the stable pass under no_grad is untouched, and the consistency loss sees the same hidden
states. Same loss and same plastic gradients (1e-5) as without it, replay and consistency on."""

import pytest
import torch
from helpers import TOKENIZER, arguments, batches, lora, method, peft_model
from tiny import sentiment_rows, tiny_llama

from ilora import ILoRATrainer
from ilora.data.encode import encode_rows


def one_replay_step(checkpointing: bool):
    model = peft_model(init_lora_weights=False)  # A and B random: every plastic tensor gets a gradient
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ilora = method(model=model, consistency_weight=1.0, ilora_buffer_size=16)
    with torch.no_grad():  # the stable adapter apart from the plastic one: the consistency loss is not 0
        generator = torch.Generator().manual_seed(0)
        for t in ilora.adapters.stable:
            t.add_(0.1 * torch.randn(t.shape, generator=generator))
    first, second = batches(2)
    with torch.no_grad():
        ilora.loss(first)  # fills the buffer: the second micro-batch replays and is consistency-checked
    loss = ilora.loss(second)
    loss.backward()
    consistency = ilora.pop_logs()["consistency_loss"]
    return loss.detach(), consistency, [t.grad.clone() for t in ilora.adapters.plastic]


def test_same_loss_and_gradients_with_and_without_checkpointing():
    base_loss, base_consistency, base_grads = one_replay_step(False)
    loss, consistency, grads = one_replay_step(True)
    assert torch.allclose(loss, base_loss, atol=1e-5) and consistency == pytest.approx(base_consistency, abs=1e-5)
    assert base_consistency > 1e-4 and all(g.abs().sum() > 0 for g in base_grads)
    assert len(grads) == len(base_grads)
    for g, b in zip(grads, base_grads):
        assert torch.allclose(g, b, atol=1e-5), (g - b).abs().max()


def test_the_trainer_flag_trains_the_same_trajectory(tmp_path):
    from transformers import TrainingArguments

    def losses(checkpointing: bool):
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            per_device_train_batch_size=4,
            max_steps=4,
            learning_rate=5e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=3,
            disable_tqdm=True,
            gradient_checkpointing=checkpointing,
        )
        trainer = ILoRATrainer(
            model=tiny_llama(),
            args=args,
            **arguments(ilora_buffer_size=8),
            peft_config=lora(),
            train_dataset=encode_rows(sentiment_rows(16), TOKENIZER, 64, False),
            processing_class=TOKENIZER,
        )
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        return [e["loss"] for e in logs], [e.get("consistency_loss", 0.0) for e in logs]

    plain, checkpointed = losses(False), losses(True)
    assert checkpointed[0] == pytest.approx(plain[0], abs=1e-5) and len(plain[0]) == 4
    assert checkpointed[1] == pytest.approx(plain[1], abs=1e-5) and max(plain[1]) > 0
