"""A tiny random Llama and a byte-level tokenizer, built in code in milliseconds (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CORPUS = [
    "The movie was great and the acting superb. positive negative neutral",
    "A dull, boring film with a weak plot. Answer: fresh rotten",
    "Review: what a delight. Sentiment: good bad yes no",
    "Question: which party said this? democratic republican moderator",
]


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}"
        )
    return fast


def tiny_llama(
    vocab_size: int = 300, layers: int = 2, seed: int = 0, hidden_size: int = 32, initializer_range: float = 0.02
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        initializer_range=initializer_range,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(directory: Path, chat_template: bool = False, seed: int = 0, **model_settings) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed=seed, **model_settings).save_pretrained(directory)
    tiny_tokenizer(chat_template).save_pretrained(directory)
    return directory


# A tiny Llama that learns through LoRA: the default one (initializer_range 0.02) is so close to
# uniform that LoRA on q/v barely moves its answers (every accuracy stays at chance). Larger initial
# weights give attention something to steer: it learns a keyword-to-label task to ~95% in 40 steps.
LEARNER = {"hidden_size": 64, "initializer_range": 0.2}


def keyword_rows(n: int, flipped: bool = False, offset: int = 0) -> list[dict]:
    """A toy sentiment task: the keyword decides the label. `flipped` swaps the labels, so a model
    that learns the flipped task must forget the original one: forgetting that a test can see."""
    rows = []
    for row in sentiment_rows(n, offset=offset):
        label = row["response"]
        if flipped:
            label = "negative" if label == "positive" else "positive"
        rows.append({"prompt": row["prompt"], "response": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, offset: int = 0) -> list[dict]:
    words = ["great", "boring", "superb", "dull", "delight", "weak"]
    rows = []
    for i in range(offset, offset + n):
        word = words[i % len(words)]
        label = "positive" if word in ("great", "superb", "delight") else "negative"
        rows.append({"prompt": f"Review {i}: the film was {word}. Sentiment:", "response": label})
    return rows


def two_task_config(directory: Path, model_dir: Path, **settings) -> dict:
    """A two-task sequence (alpha, beta) on the tiny model; `settings` override the defaults."""
    tasks = []
    for k, name in enumerate(["alpha", "beta"]):
        write_jsonl(directory / f"{name}.jsonl", sentiment_rows(16, offset=50 * k))
        tasks.append(
            {"name": name, "train": f"{name}.jsonl", "test": f"{name}.jsonl", "choices": ["positive", "negative"]}
        )
    defaults = {
        "model_name_or_path": str(model_dir),
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.01,
        "ilora_buffer_size": 6,
        "ema_alpha": 0.8,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "tasks": tasks,
    }
    return {**defaults, **settings}
