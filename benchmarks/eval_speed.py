"""Choice-ranking evaluation: KV-cache sharing + length grouping vs one forward per candidate.

Both scorers rank the same candidates on the same rows; the script checks they pick the same
answers and prints `speedup` (naive seconds / fast seconds) in the JSON object on the last line.

    python benchmarks/eval_speed.py                          # tiny random Llama, synthetic rows
    python benchmarks/eval_speed.py --model smollm2 --rows 150   # SmolLM2 on the demo's tweet and debate tests
    python benchmarks/eval_speed.py --model smollm2 --rows 150 --device cuda --bf16   # on a GPU
The first line names the hardware and the precision; on a GPU the peak GPU memory is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ilora.evaluation.scoring import build_test_set, predict_choices, score_choices, score_choices_naive
from ilora.runtime import precision


def tiny_setup(rows: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "film",
        "movie",
        "was",
        "great",
        "dull",
        "boring",
        "superb",
        "plot",
        "review",
        "fresh",
        "rotten",
        "yes",
        "no",
    ]
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(rows):
        n = int(torch.randint(20, 60, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
        data.append({"prompt": text, "response": ["fresh", "rotten", "yes"][i % 3]})
    return LlamaForCausalLM(config).eval(), tokenizer, [("synthetic", data, ["fresh", "rotten", "yes"])]


def smollm2_setup(rows: int, data_dir: Path):
    from ilora.data.corpora import build_benchmark
    from ilora.data.formats import read_rows
    from ilora.runtime.loader import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2")
    entries = build_benchmark(data_dir, ["tweets", "debate"], 30, rows, seed=0)
    return (
        model.eval(),
        tokenizer,
        [(e["name"], read_rows(data_dir / e["test"]).to_list(), e["choices"]) for e in entries],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' or 'smollm2'")
    p.add_argument("--rows", type=int, default=96, help="test rows per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cutoff_len", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--data_dir", type=Path, default=Path("runs/bench-data"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as evaluation does when training used bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, tasks = tiny_setup(args.rows) if args.model == "tiny" else smollm2_setup(args.rows, args.data_dir)
    model = model.to(args.device)
    hardware = precision.detect(args.device)
    print(
        f"hardware: {hardware.label()}, native bf16: {hardware.native_bf16}, precision: {'bf16' if args.bf16 else 'fp32'}"
    )
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    pad = tokenizer.pad_token_id
    totals = {"fast": 0.0, "naive": 0.0}
    peaks: dict[str, float] = {}
    same = True
    for name, rows, choices in tasks:
        test = build_test_set(name, rows, tokenizer, "choice", choices, args.cutoff_len, use_chat_template=False)
        with autocast:
            score_choices(model, test, pad, args.batch)  # warm-up
        timed = {}
        for label, scorer in (("fast", score_choices), ("naive", score_choices_naive)):
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with autocast:
                timed[label] = predict_choices(scorer(model, test, pad, args.batch))
            if args.device == "cuda":
                torch.cuda.synchronize()
                peaks[label] = max(peaks.get(label, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            totals[label] += time.perf_counter() - start
        agree = timed["fast"] == timed["naive"]
        same &= agree
        print(f"{name}: {len(test)} rows x {len(choices)} choices, identical picks: {agree}")
    print(f"fast {totals['fast']:.2f}s  naive {totals['naive']:.2f}s  (model={args.model}, threads={args.threads})")
    summary = {
        "speedup": round(totals["naive"] / totals["fast"], 3),
        "identical_choices": same,
        "fast_s": round(totals["fast"], 3),
        "naive_s": round(totals["naive"], 3),
        "hardware": hardware.label(),
        "precision": "bf16" if args.bf16 else "fp32",
    }
    if peaks:
        summary["gpu_peak_mib"] = {k: round(v) for k, v in peaks.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
