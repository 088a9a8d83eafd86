"""Per-rank memory and step time of I-LoRA under DDP, FSDP2 and DeepSpeed ZeRO-3, 2 processes (torchrun).

Each mode runs in its own `torchrun --nproc_per_node 2` (gloo on the CPU, nccl on CUDA GPUs), one
after the other, with the same model, batch and steps. Per rank it reports:
  param_mib   bytes of the parameters the rank holds after the Trainer prepared the model (FSDP2: its
              slices; ZeRO-3: its partitions plus the whole copies it keeps of "persistent" small
              tensors; DDP: the whole model)
  rss_mib     resident memory at the end of training (CPU), and peak_rss_mib over the whole process:
              the peak includes loading the whole model on every rank before it is sharded
              (ZeRO-3 runs in fp32: DeepSpeed's own bf16 mode is refused by ilora)
  gpu_peak_mib  torch.cuda.max_memory_allocated (CUDA only)
  s_per_step  median seconds per optimizer step after the warm-up steps

    python benchmarks/sharded_memory.py                     # SmolLM2-135M, fp32, CPU
    python benchmarks/sharded_memory.py --model tiny        # seconds, for a smoke run
    python benchmarks/sharded_memory.py --device cuda --bf16

The first line names the hardware and the precision; the last is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("ddp", "fsdp2", "zero3")
SHARDED = ("fsdp2", "zero3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (SmolLM2-135M) or 'tiny' (random Llama)")
    p.add_argument("--batch", type=int, default=4, help="current rows per rank and step (replay rows: the same)")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured optimizer steps")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="DDP and FSDP2 only (DeepSpeed is refused in bf16)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bf16 and "zero3" in args.modes.split(","):
        p.error("--bf16 with zero3: ilora trains DeepSpeed in fp32 only; leave zero3 out of --modes")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from ilora.runtime import precision

    hardware = precision.detect(args.device)
    print(
        f"hardware: {hardware.label()}, native bf16: {hardware.native_bf16}, precision: "
        f"{'bf16' if args.bf16 else 'fp32'}, 2 processes, model {args.model}",
        flush=True,
    )
    results = {}
    for mode in args.modes.split(","):
        output = Path(f"/tmp/ilora-sharded-{os.getpid()}-{mode}.json")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29641",
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--worker",
            mode,
            "--output",
            str(output),
        ]
        subprocess.run(command, check=True)
        results[mode] = json.loads(output.read_text())
        output.unlink()
        for rank, row in enumerate(results[mode]["ranks"]):
            print(
                f"{mode:6s} rank {rank}: "
                + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            )
    ratios = {}
    for mode in (m for m in SHARDED if m in results and "ddp" in results):
        ratios[mode] = {
            key: results[mode]["ranks"][0][key] / results["ddp"]["ranks"][0][key]
            for key in ("param_mib", "rss_mib", "peak_rss_mib", "s_per_step", "gpu_peak_mib")
            if results["ddp"]["ranks"][0].get(key)
        }
        print(f"{mode} / ddp (rank 0): " + "  ".join(f"{k} {v:.3f}" for k, v in ratios[mode].items()))
    print(json.dumps({"settings": vars(args) | {"worker": None}, "results": results, "over_ddp": ratios}))


def worker(args) -> None:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback, TrainingArguments

    from ilora import ContinualArguments, ILoRATrainer
    from ilora.runtime import distributed, sharding
    from ilora.runtime.loader import load_model_and_tokenizer

    if args.model == "smollm2":
        model, tokenizer = load_model_and_tokenizer("smollm2")
        layer = "LlamaDecoderLayer"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import tiny_llama, tiny_tokenizer

        model, tokenizer, layer = tiny_llama(layers=4, hidden_size=128), tiny_tokenizer(), "LlamaDecoderLayer"
    steps = args.warmup + args.steps
    rows = args.batch * 2 * steps  # every rank's rows for every step (the sampler shards them)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (rows, args.length), generator=generator)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist(), "attention_mask": [1] * args.length} for row in ids]
    sharded = {
        "ddp": {},
        "fsdp2": {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [layer]}},
        "zero3": {
            "deepspeed": {
                "zero_optimization": {"stage": 3},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
            }
        },
    }[args.worker]
    training = TrainingArguments(
        output_dir=f"/tmp/ilora-sharded-{args.worker}",
        per_device_train_batch_size=args.batch,
        max_steps=steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        logging_steps=steps,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        ddp_backend="gloo" if args.device == "cpu" else "nccl",
        **sharded,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.param_mib = [], 0.0

        def on_train_begin(self, a, state, control, model=None, **kwargs):
            params = list(trainer.model.parameters())
            held = sum(t.numel() * t.element_size() for t in sharding.local(params))
            # ZeRO-3 keeps small tensors whole besides their partitions, once first gathered
            held += sum(p.ds_numel * p.element_size() for p in params if getattr(p, "ds_persist", False))
            self.param_mib = held / 2**20

        def on_step_begin(self, a, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    clock = Clock()
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    trainer = ILoRATrainer(
        model=model,
        args=training,
        continual_args=ContinualArguments(ilora_buffer_size=64),
        peft_config=lora,
        train_dataset=examples,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    row = {
        "param_mib": clock.param_mib,
        "rss_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "s_per_step": statistics.median(clock.times[args.warmup :]),
    }
    if args.device == "cuda":
        row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    ranks = [dict(zip(row, values)) for values in zip(*(distributed.gather(v) for v in row.values()))]
    if distributed.rank() == 0:
        Path(args.output).write_text(json.dumps({"ranks": ranks}))
    torch.distributed.destroy_process_group()  # a clean exit: gloo's threads would abort at interpreter teardown


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
