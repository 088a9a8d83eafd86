"""Shared builders for method-level tests: a tiny PEFT model with both adapters, and batches."""

from __future__ import annotations

import dataclasses

import torch
from peft import LoraConfig
from tiny import sentiment_rows, tiny_llama, tiny_tokenizer, write_jsonl

from ilora import methods
from ilora.config.arguments import ContinualArguments
from ilora.core.adapters import attach_adapters
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import PadCollator, encode_rows
from ilora.methods.base import Method

TOKENIZER = tiny_tokenizer()
PAD = TOKENIZER.pad_token_id


def first_task(root, model_dir, flags: list[str]):
    """Training data (`good.jsonl`) and a finished task `t1` trained on it through the CLI."""
    from ilora.cli import main

    data = write_jsonl(root / "good.jsonl", sentiment_rows(8))
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(root / "t1"),
        "--current_task_id",
        "t1",
    ]
    assert main(argv + flags) == 0
    return data, root / "t1"


def lora(**overrides) -> LoraConfig:
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings.update(overrides)
    return LoraConfig(**settings)


def peft_model(with_stable: bool = True, seed: int = 0, **lora_overrides):
    torch.manual_seed(seed)
    return attach_adapters(tiny_llama(seed=seed), lora(**lora_overrides), with_stable=with_stable)


def batches(n_batches: int, batch_size: int = 4, offset: int = 0) -> list[dict]:
    rows = sentiment_rows(n_batches * batch_size, offset=offset)
    examples = encode_rows(rows, TOKENIZER, cutoff_len=64, use_chat_template=False)
    collate = PadCollator(PAD)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def arguments(method: str = "ilora", **settings) -> dict:
    """`continual_args` and `method_options` for `ILoRATrainer`, from one set of keys: each key goes to
    the class that has it (the shared ContinualArguments, or the method's own options)."""
    continual_fields = {f.name for f in dataclasses.fields(ContinualArguments)}
    continual = ContinualArguments(method=method, **{k: v for k, v in settings.items() if k in continual_fields})
    options_cls = methods.get(continual.method).Arguments
    own = {k: v for k, v in settings.items() if k not in continual_fields}
    if own and options_cls is None:
        raise TypeError(f"method {continual.method} takes no options, got {sorted(own)}")
    return {"continual_args": continual, "method_options": options_cls(**own) if options_cls else None}


def method(model=None, replay_batch_size: int = 4, buffer: ReplayBuffer | None = None, options=None, **args) -> Method:
    """The method `args` name (I-LoRA by default) on a tiny model, outside any Trainer."""
    model = model if model is not None else peft_model()
    settings = dict(ilora_buffer_size=16)
    settings.update(args)
    parts = arguments(**settings)
    continual = parts["continual_args"]
    cls = methods.get(continual.method)
    if buffer is None and cls.uses_replay(continual):
        buffer = ReplayBuffer(continual.ilora_buffer_size, seed=0)
    options = options if options is not None else parts["method_options"]
    return cls(model, continual, options, pad_token_id=PAD, replay_batch_size=replay_batch_size, buffer=buffer)


def train(ilora: Method, data: list[dict], lr: float = 0.05, record=None) -> None:
    """The loop the Trainer runs: loss, backward, optimizer step, EMA."""
    optimizer = torch.optim.SGD(ilora.adapters.plastic, lr=lr)
    for batch in data:
        ilora.loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        if record is not None:
            record.append([t.detach().clone() for t in ilora.adapters.plastic])
        ilora.after_optimizer_step()


def assert_closed_form_ema(stable, initial, trajectory, ema_alpha: float) -> None:
    """The stable tensors equal the EMA of the plastic trajectory (one snapshot per optimizer step),
    started from `initial`, with a = min(1 - 1/(t+1), ema_alpha); and they moved."""
    expected = [t.double() for t in initial]
    for step, plastic in enumerate(trajectory, start=1):
        a = min(1 - 1 / (step + 1), ema_alpha)
        expected = [a * s + (1 - a) * p.double() for s, p in zip(expected, plastic)]
    for got, want in zip(stable, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert max((s - i).abs().max().item() for s, i in zip(stable, initial)) > 1e-4, "the stable adapter never moved"


def assert_peft_loads(model_dir, adapter_dir) -> None:
    """`PeftModel.from_pretrained` loads the saved adapter whole: every tensor of its file, as saved, is in
    the loaded model, and nothing else."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys(), adapter_dir
    assert all(torch.equal(saved[k], loaded[k].to(saved[k].dtype)) for k in saved), adapter_dir


def failure(result) -> str:
    """What a failed ilora subprocess said: its one-line refusals (any rank's), then the end of stderr."""
    said = [line for line in result.stderr.splitlines() if line.startswith("ilora ") or "Traceback" in line]
    return "\n".join(said[:10]) + "\n...\n" + result.stderr[-2500:]
