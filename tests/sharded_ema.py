"""Run under torchrun (2 CPU processes): train I-LoRA under FSDP2 or DeepSpeed and check, on
rank 0, that the stable adapter equals the closed-form EMA of the plastic trajectory, both gathered
whole from the ranks' parts.
`python -m torch.distributed.run --nproc_per_node 2 sharded_ema.py OUTPUT_DIR fsdp2|zero3|zero2-bf16`
(zero2-bf16: DeepSpeed's bf16 mode; whole parameters, the stable adapter cast and put back in fp32)."""

import sys
from pathlib import Path

import torch
from helpers import arguments, assert_closed_form_ema, lora
from test_trainer import examples
from tiny import tiny_llama, tiny_tokenizer
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback, TrainingArguments

from ilora import ILoRATrainer
from ilora.core.adapters import AdapterPair

EMA_ALPHA = 0.6


SHARDING = {
    "fsdp2": {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
    # DeepSpeed's default persistence threshold: every tensor of the tiny model is "persistent", kept
    # whole between forwards besides its partition (the case where the EMA must drop stale copies)
    "zero3": {
        "deepspeed": {
            "zero_optimization": {"stage": 3},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
        }
    },
    # DeepSpeed's bf16 mode casts the module, stable adapter too; ilora puts the stable one back in fp32
    "zero2-bf16": {
        "bf16": True,
        "deepspeed": {
            "zero_optimization": {"stage": 2},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
        },
    },
}


def partitioned(tensor) -> bool:
    return isinstance(tensor, DTensor) or hasattr(tensor, "ds_tensor")


def whole(tensors):
    """Every rank's parts gathered (a collective: every rank calls it)."""
    if any(hasattr(t, "ds_tensor") for t in tensors):
        import deepspeed

        with deepspeed.zero.GatheredParameters(tensors):
            return [t.detach().clone() for t in tensors]
    return [t.full_tensor() if isinstance(t, DTensor) else t.detach().clone() for t in tensors]


class RecordWhole(TrainerCallback):
    """The stable adapter once sharded, and the plastic one after every optimizer step, whole."""

    def __init__(self):
        self.trainer, self.initial, self.snapshots, self.sharded = None, None, [], False

    def on_train_begin(self, args, state, control, **kwargs):
        pair = AdapterPair(self.trainer.model)  # the sharded parameters (ilora pairs them again too)
        # sharded, or (DeepSpeed's bf16 mode) cast: the engine has taken the model over
        self.sharded = all(partitioned(t) or t.dtype == torch.bfloat16 for t in pair.plastic + pair.stable)
        self.initial = whole(pair.stable)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.snapshots.append(whole(AdapterPair(self.trainer.model).plastic))


def main(output_dir: Path, sharding: str) -> None:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        learning_rate=0.05,
        max_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        ddp_backend="gloo",
        **SHARDING[sharding],
    )
    recorder = RecordWhole()
    trainer = ILoRATrainer(
        model=tiny_llama(),
        args=args,
        **arguments(ema_alpha=EMA_ALPHA, ilora_buffer_size=8),
        peft_config=lora(),
        train_dataset=examples(),
        processing_class=tiny_tokenizer(),
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    stable = whole(trainer.method.adapters.stable)
    if torch.distributed.get_rank() == 0:
        assert recorder.sharded, f"the adapters were not sharded: {sharding} did not run"
        assert all(t.dtype == torch.float32 for t in stable), "the stable adapter is not in fp32"
        assert len(recorder.snapshots) == 5
        assert_closed_form_ema(stable, recorder.initial, recorder.snapshots, EMA_ALPHA)
        (output_dir / "closed-form-ema.ok").write_text("ok\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: gloo's threads would abort at interpreter teardown
