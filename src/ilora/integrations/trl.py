"""Any ilora method inside TRL's `SFTTrainer`, with TRL's own dataset handling.

    from ilora import ContinualArguments, ILoRAArguments
    from ilora.integrations.trl import ILoRASFTTrainer
    from trl import SFTConfig

    trainer = ILoRASFTTrainer(
        model=base_model,
        args=SFTConfig(output_dir="out/t1", max_length=512),
        continual_args=ContinualArguments(method="ilora", current_task_id="t1"),
        method_options=ILoRAArguments(ema_alpha=0.99),
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        train_dataset=dataset,          # any format SFTTrainer reads: messages, prompt/completion, text
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_task()                 # the task directory `ilora train` writes: chain, eval, export it

TRL tokenizes, builds the labels (its `completion_only_loss`, `assistant_only_loss`) and pads on the
right; ilora attaches the adapters (fresh, or the previous task's with `previous_task_model`), runs the
method's loss, its hooks and its checkpoint state. TRL's own loss and its metrics (entropy, token
accuracy) give way to the method's loss and logged terms. Needs `pip install 'ilora[trl]'`.
"""

from __future__ import annotations

from trl import SFTTrainer

from ilora.trainer import ContinualTrainerMixin


class ILoRASFTTrainer(ContinualTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` training an ilora method: `continual_args` and `method_options` as for
    `ILoRATrainer`; every other argument as `SFTTrainer` takes it. `peft_config` is ilora's to apply
    (the plastic adapter, and what the method adds), never TRL's."""

    def _training_data(self, dataset, tokenizer, collator, pad_token_id: int):
        return dataset, collator  # TRL prepares the rows and picks its collator
