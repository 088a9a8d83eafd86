"""What an I-LoRA optimizer step costs over experience replay (ER) and sequential LoRA.

Variants, timed interleaved in one process (A B C D E A B C D E ...), median seconds per optimizer step
after warm-up:
  seq_lora    current batch only
  er          current + replay rows, no stable adapter
  floor       er + a bare no-grad stable forward through the decoder over as many rows as the replay
              batch: the cost I-LoRA cannot avoid (no consistency, no EMA)
  ilora       er + stable no-grad pass over the replay rows + consistency + EMA   (ilora.methods.ilora)
  selective   ilora with selective_update (stable pass over the whole batch, with the LM head)
  three_pass  the public implementations' step, written out below: plastic pass with grad over
              current + replay, a second plastic pass with grad over the replay rows for the hidden
              states, a stable pass with the LM head and every hidden state, an EMA found by
              parameter-name matching with a clone per tensor, and `.item()` logging every step.
Also: the EMA update alone (fraction of the I-LoRA step), tokens/s, the peak resident memory of
each variant in its own process (`--memory`, CPU), and on a GPU the peak GPU memory of each variant
(`torch.cuda.max_memory_allocated`). The first line names the hardware and the precision.

    python benchmarks/step_overhead.py                      # tiny random Llama, seconds
    python benchmarks/step_overhead.py --model smollm2      # SmolLM2-135M (the targets), minutes
    python benchmarks/step_overhead.py --model smollm2 --device cuda --bf16   # on a GPU

The last line printed is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from peft import LoraConfig

from ilora import methods
from ilora.config.arguments import ContinualArguments
from ilora.core.adapters import PLASTIC, STABLE, AdapterPair, attach_adapters
from ilora.core.buffer import ReplayBuffer
from ilora.methods.base import causal_lm_loss
from ilora.methods.ilora import consistency_loss, ema_coefficient
from ilora.runtime import precision

VARIANTS = ("seq_lora", "er", "floor", "ilora", "selective", "three_pass")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random 4-layer Llama) or 'smollm2'")
    p.add_argument("--batch", type=int, default=8, help="current rows per step (replay rows: the same)")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (LoRA weights stay fp32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model and batches live")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per variant (one process each)")
    p.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute the plastic pass's activations in the backward (with --memory: measured beside)",
    )
    p.add_argument(
        "--quantization_bit",
        type=int,
        choices=(4, 8),
        help="also time the I-LoRA step and measure its peak memory on a 4/8-bit base (QLoRA, "
        "bitsandbytes) against the full-precision base, in one run",
    )
    p.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)  # a child on the quantized base
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(name: str, quantization_bit: int | None = None):
    from ilora.runtime.loader import load_model_and_tokenizer

    quantization = None
    if quantization_bit:
        quantization = {"bits": 8} if quantization_bit == 8 else {"bits": 4, "type": "nf4", "double": True}
    if name == "smollm2":
        return load_model_and_tokenizer("smollm2", quantization=quantization)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    if quantization is None:
        return model
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as directory:  # the loader quantizes what it reads from a directory
        model.save_pretrained(directory)
        PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), eos_token="<unk>"
        ).save_pretrained(directory)
        return load_model_and_tokenizer(directory, quantization=quantization)[0]


def random_rows(n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g) for _ in range(n)]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synchronize(device: str) -> None:
    """Wait for the device: a GPU step is timed when it is done, not when it is queued."""
    if device == "cuda":
        torch.cuda.synchronize()


def batch_of(rows: list[torch.Tensor]) -> dict:
    ids = torch.stack(rows)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "attention_mask": torch.ones_like(ids),
        "lengths": [len(r) for r in rows],
    }


class Variant:
    """One kind of step on the shared model; `step()` is one full optimizer step."""

    def __init__(self, name: str, model, args: argparse.Namespace, vocab: int):
        self.name, self.model = name, model
        method_name, settings = {
            "seq_lora": ("seq_lora", {}),
            "er": ("er", {}),
            "floor": ("er", {}),
            "ilora": ("ilora", {}),
            "selective": ("ilora", dict(selective_update=True, min_update_threshold=0.0)),
            "three_pass": ("ilora", {}),
        }[name]
        continual = ContinualArguments(method=method_name, ilora_buffer_size=4 * args.batch)
        method = methods.get(method_name)
        options = method.Arguments(ema_alpha=0.99, **settings) if method.Arguments else None
        buffer = ReplayBuffer(continual.ilora_buffer_size, seed=1)
        for row in random_rows(continual.ilora_buffer_size, args.length, vocab, seed=2):
            buffer.add(row, row.clone())
        self.method = method(model, continual, options, pad_token_id=0, replay_batch_size=args.batch, buffer=buffer)
        if self.method.buffer is not None:
            self.method.buffer.capacity = 0  # keep replay rows fixed-length: the stream is not stored
        self.optimizer = torch.optim.AdamW(self.method.adapters.plastic, lr=1e-4)
        self.batches = [
            to_device(batch_of(random_rows(args.batch, args.length, vocab, seed=s)), args.device) for s in range(4)
        ]
        self.rows_per_step = args.batch if name == "seq_lora" else 2 * args.batch
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
        self.calls = 0

    def step(self) -> None:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        with self.autocast:
            loss = three_pass_loss(self.method, batch) if self.name == "three_pass" else self.method.loss(batch)
            if self.name == "floor":
                bare_stable_forward(self.method, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.name == "three_pass":
            three_pass_ema(self.model, self.method.step + 1, self.method.options.ema_alpha)
            self.method.step += 1
        else:
            self.method.after_optimizer_step()


@torch.no_grad()
def bare_stable_forward(method, batch: dict) -> None:
    """The stable adapter's forward over replay-batch-sized rows, its output unused."""
    with method.adapters.active(STABLE):
        method.model.get_base_model().get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )


# ------------------------------------------------ the public implementations' step
def three_pass_loss(method, batch: dict) -> torch.Tensor:
    model, pad = method.model, method.pad_token_id
    replay_ids, _, _ = method.buffer.sample(method.replay_batch_size)
    replay = torch.stack(replay_ids).to(batch["input_ids"].device)
    ids = torch.cat([batch["input_ids"], replay])
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # pass 1, with grad
    ce = causal_lm_loss(out.logits, ids)
    plastic = model(input_ids=replay, attention_mask=torch.ones_like(replay), output_hidden_states=True)  # pass 2
    with torch.no_grad(), method.adapters.active(STABLE):
        stable = model(input_ids=replay, attention_mask=torch.ones_like(replay), output_hidden_states=True)  # pass 3
    consistency = consistency_loss([plastic.hidden_states[-1]], [stable.hidden_states[-1]], torch.ones_like(replay))
    loss = ce + consistency
    _ = (ce.item(), consistency.item(), pad)  # per-step logging with host syncs
    return loss


@torch.no_grad()
def three_pass_ema(model, step: int, ema_alpha: float) -> None:
    """EMA by parameter-name matching, one tensor at a time, with a clone of each (as published)."""
    a = ema_coefficient(step, ema_alpha)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{STABLE}." in name:
            source = params[name.replace(f".{STABLE}.", f".{PLASTIC}.")].detach().clone()
            param.copy_(a * param + (1 - a) * source)


# --------------------------------------------------------------------- runs
def peft_model(args, quantization_bit: int | None = None):
    model = build_model(args.model, quantization_bit)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","))
    if quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        peft = attach_adapters(model, config, with_stable=True)  # bitsandbytes placed it
    else:
        peft = attach_adapters(model, config, with_stable=True).to(args.device)
    if args.gradient_checkpointing:
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    return peft, model.config.vocab_size


def time_variants(args) -> dict:
    model, vocab = peft_model(args)
    variants = [Variant(name, model, args, vocab) for name in VARIANTS]
    for _ in range(args.warmup):
        for v in variants:
            v.step()
    times = {v.name: [] for v in variants}
    gpu_peak = {v.name: 0 for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(args.device)
            start = time.perf_counter()
            v.step()
            synchronize(args.device)
            times[v.name].append(time.perf_counter() - start)
            if args.device == "cuda":
                gpu_peak[v.name] = max(gpu_peak[v.name], torch.cuda.max_memory_allocated())
    medians = {name: statistics.median(t) for name, t in times.items()}
    adapters = variants[VARIANTS.index("ilora")].method.adapters
    tokens = {v.name: v.rows_per_step * args.length / medians[v.name] for v in variants}
    result = {
        "median_step_s": medians,
        "ema_s": ema_seconds(adapters, args.device),
        "tokens_per_s": tokens,
        "adapter_params": sum(t.numel() for t in adapters.plastic),
    }
    if args.device == "cuda":
        result["gpu_peak_mib"] = {name: peak / 2**20 for name, peak in gpu_peak.items()}
    return result


def ema_seconds(adapters: AdapterPair, device: str, repeats: int = 50) -> float:
    adapters.ema_(0.01)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        adapters.ema_(0.01)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def child_peak_rss(args) -> None:
    """One variant alone in this process: its peak resident memory, and the part the steps added."""
    model, vocab = peft_model(args, args.quantization_bit if args.quantized else None)
    variant = Variant(args.child, model, args, vocab)
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark (Linux)
        handle.write("5")
    for _ in range(3):
        variant.step()
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak, "step_rss_mib": peak - before}))


def peak_rss(args, variant: str, checkpointing: bool = False, quantized: bool = False) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--targets",
        args.targets,
        "--rank",
        str(args.rank),
        "--threads",
        str(args.threads),
    ] + (["--bf16"] if args.bf16 else [])
    argv += ["--gradient_checkpointing"] if checkpointing else []
    argv += ["--quantization_bit", str(args.quantization_bit), "--quantized"] if quantized else []
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_quantized(args) -> dict:
    """The I-LoRA step on the full-precision base and on the quantized one, interleaved in one process."""
    steps = {}
    for label, bits in (("full", None), (f"{args.quantization_bit}-bit", args.quantization_bit)):
        model, vocab = peft_model(args, bits)
        steps[label] = Variant("ilora", model, args, vocab)
    for _ in range(args.warmup):
        for v in steps.values():
            v.step()
    times = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, v in steps.items():
            began = time.perf_counter()
            v.step()
            times[label].append(time.perf_counter() - began)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_peak_rss(args)
    result = time_variants(args)
    step = result["median_step_s"]
    hardware = precision.detect(args.device)
    print(
        f"hardware: {hardware.label()}, native bf16: {hardware.native_bf16}, precision: "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    print(
        f"model={args.model} batch={args.batch}+{args.batch} length={args.length} targets={args.targets} "
        f"threads={args.threads} bf16={args.bf16} rounds={args.rounds}"
    )
    gpu = result.get("gpu_peak_mib")
    print(f"{'variant':<12}{'s/step':>10}{'tokens/s':>12}{'vs er':>8}" + (f"{'GPU MiB':>10}" if gpu else ""))
    for name in VARIANTS:
        print(
            f"{name:<12}{step[name]:>10.4f}{result['tokens_per_s'][name]:>12.0f}{step[name] / step['er']:>8.3f}"
            + (f"{gpu[name]:>10.0f}" if gpu else "")
        )
    print(f"EMA update alone: {1000 * result['ema_s']:.3f} ms for {result['adapter_params']:,} adapter parameters")
    summary = {
        "ilora_over_er": step["ilora"] / step["er"],
        "floor_over_er": step["floor"] / step["er"],
        "ilora_over_floor": step["ilora"] / step["floor"],
        "ilora_over_seq": step["ilora"] / step["seq_lora"],
        "selective_over_ilora": step["selective"] / step["ilora"],
        "three_pass_over_ilora": step["three_pass"] / step["ilora"],
        "ema_fraction": result["ema_s"] / step["ilora"],
        "hardware": hardware.label(),
        "precision": "bf16" if args.bf16 else "fp32",
    }
    if gpu:
        summary["gpu_peak_mib"] = gpu
    if args.quantization_bit:
        quantized = time_quantized(args)
        label = f"{args.quantization_bit}-bit"
        print(
            f"I-LoRA step on the base: full precision {quantized['full']:.4f} s, {label} {quantized[label]:.4f} s "
            f"({quantized[label] / quantized['full']:.2f}x)"
        )
        summary["quantized_step_s"] = quantized
        if args.memory:
            full, low = peak_rss(args, "ilora"), peak_rss(args, "ilora", quantized=True)
            print(f"I-LoRA peak RSS, MiB: full precision {full['peak_rss_mib']:.0f}, {label} {low['peak_rss_mib']:.0f}")
            summary["quantized_peak_rss_mib"] = {"full": full["peak_rss_mib"], label: low["peak_rss_mib"]}
    if args.memory:
        measured = {name: peak_rss(args, name) for name in ("seq_lora", "er", "ilora", "three_pass")}
        print(
            "peak RSS, MiB (whole process / added by the steps): "
            + ", ".join(f"{k}={v['peak_rss_mib']:.0f}/{v['step_rss_mib']:.0f}" for k, v in measured.items())
        )
        summary["peak_rss_mib"] = {k: v["peak_rss_mib"] for k, v in measured.items()}
        summary["step_rss_mib"] = {k: v["step_rss_mib"] for k, v in measured.items()}
        summary["peak_rss_ilora_over_er"] = measured["ilora"]["peak_rss_mib"] / measured["er"]["peak_rss_mib"]
        # gradient checkpointing: the I-LoRA step's added memory with and without it
        plain, checkpointed = peak_rss(args, "ilora", False), peak_rss(args, "ilora", True)
        print(
            f"gradient checkpointing, I-LoRA step: added {plain['step_rss_mib']:.0f} MiB without, "
            f"{checkpointed['step_rss_mib']:.0f} MiB with"
        )
        summary["gc_step_rss_mib"] = {"without": plain["step_rss_mib"], "with": checkpointed["step_rss_mib"]}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
