"""Do the adapters `ilora export --serve` writes answer the same under vLLM as under transformers + PEFT?

Scores every served adapter on the run's choice-scored test sets (the rows and subsample `ilora run`
scored) twice: with vLLM over HTTP (each choice's log-likelihood, read from the top-20 log-probabilities
of one generated token per choice token) and with transformers + PEFT in this process (ilora's own choice
scoring, under the run's precision, or fp32 with --fp32). Prints, per adapter and task: the accuracy the
run recorded, the accuracy under PEFT here and under vLLM, the share of rows where both pick the same
answer, and the largest log-likelihood difference between them over the choices whose every token was in
vLLM's top 20 (the others are bounded, and counted).

Start the server first, from the serve directory, with the command in serve.json and a port:

    ilora export runs/ilora --serve out/serve
    cd out/serve && vllm serve BASE --enable-lora ... --port 8011          # add --dtype float32 for --fp32
    python benchmarks/vllm_serve.py --config config.yaml --serve out/serve --url http://127.0.0.1:8011

vLLM runs in its own environment (it pins its own transformers); this script needs only ilora's.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import warnings
from pathlib import Path

from peft import PeftModel

from ilora.evaluation.scoring import TestSet, predict_choices, score_choices
from ilora.pipeline.evaluate import _scorer, _test_rows
from ilora.pipeline.sequence import load_run_config
from ilora.runtime import precision
from ilora.runtime.loader import load_model_and_tokenizer

TOP = 20  # vLLM's default --max-logprobs


def vllm_scores(url: str, adapter: str, test: TestSet) -> tuple[list[list[float]], list[list[bool]]]:
    """Log-likelihood of every choice of every row, and whether it is exact (every token in the top 20).

    vLLM's `prompt_logprobs` fails under LoRA (vllm-project/vllm#16668), so each token of a choice is
    read from the top-20 log-probabilities of one generated token after the prompt and the choice's
    tokens before it; a token outside them counts at the 20th's value (an upper bound on the choice's score).
    """
    prefixes = sorted(
        {tuple(test.prompts[r] + c[:j]) for r in range(len(test)) for c in test.choice_ids[r] for j in range(len(c))}
    )
    body = {
        "model": adapter,
        "prompt": [list(p) for p in prefixes],
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": TOP,
        "return_tokens_as_token_ids": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answers = sorted(json.load(response)["choices"], key=lambda c: c["index"])
    top = {
        p: {int(k.split(":")[1]): v for k, v in a["logprobs"]["top_logprobs"][0].items()}
        for p, a in zip(prefixes, answers)
    }
    scores, exact = [], []
    for r in range(len(test)):
        row, row_exact = [], []
        for c in test.choice_ids[r]:
            steps = [top[tuple(test.prompts[r] + c[:j])] for j in range(len(c))]
            row.append(sum(step.get(token, min(step.values())) for step, token in zip(steps, c)))
            row_exact.append(all(token in step for step, token in zip(steps, c)))
        scores.append(row)
        exact.append(row_exact)
    return scores, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the config of the run exported")
    parser.add_argument("--serve", type=Path, required=True, help="the directory `ilora export --serve` wrote")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--fp32", action="store_true", help="score the PEFT side in fp32 (for a server started with --dtype float32)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT's loader, not ours

    settings = load_run_config(args.config)
    serve = json.loads((args.serve / "serve.json").read_text())
    base, tokenizer = load_model_and_tokenizer(settings.model.model_name_or_path, False)
    scorer = _scorer(settings, _test_rows(settings), tokenizer)
    hardware = precision.detect("cpu")
    bf16, fp16 = (
        (False, False) if args.fp32 else precision.choose(settings.training.bf16, settings.training.fp16, hardware)
    )
    autocast = precision.autocast_dtype(bf16, fp16)
    print(f"PEFT side: {hardware.label()}, {precision.name(bf16, fp16)}; vLLM side: the server at {args.url}\n")

    model = None
    print(
        "| adapter | task | rows | run's accuracy | PEFT here | vLLM | same answer | max abs loglik diff (exact choices) | bounded choices |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in serve["adapters"]:
        path = str(args.serve / entry["path"])
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=entry["name"])
        else:
            model.load_adapter(path, adapter_name=entry["name"])
        model.set_adapter(entry["name"])
        for test in [t for t in scorer.tests if t.scoring == "choice"]:
            with precision.inference(model, autocast):
                ours = score_choices(model, test, tokenizer.pad_token_id, settings.run.eval_batch_size)
            theirs, exact = vllm_scores(args.url, entry["name"], test)
            gold = test.gold()
            ours_pick, theirs_pick = predict_choices(ours), predict_choices(theirs)
            diffs = [abs(a - b) for x, y, e in zip(ours, theirs, exact) for a, b, ok in zip(x, y, e) if ok]
            bounded = sum(not ok for row in exact for ok in row)
            recorded = entry["accuracy"].get(test.name)
            print(
                f"| {entry['name']} | {test.name} | {len(test)} "
                f"| {'' if recorded is None else f'{100 * recorded:.1f}'} "
                f"| {100 * _accuracy(ours_pick, gold):.1f} | {100 * _accuracy(theirs_pick, gold):.1f} "
                f"| {100 * _accuracy(ours_pick, theirs_pick):.1f}% | {max(diffs, default=float('nan')):.2e} | {bounded} |"
            )


def _accuracy(picks: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(picks, gold)) / len(gold)


if __name__ == "__main__":
    main()
