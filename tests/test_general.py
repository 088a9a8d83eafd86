"""The general-ability check: perplexity on a held-out text, equal to a direct computation, reported
before training and after every task."""

import json
import math

import pytest
import torch
import yaml
from tiny import two_task_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from ilora import ILoRAError
from ilora.cli import main
from ilora.evaluation.general import perplexity, read_text, windows

TEXT = " ".join(f"The movie was great and the acting superb, said review {i}." for i in range(40))


def test_perplexity_equals_a_direct_computation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chunks = windows(TEXT, tokenizer, window=16, count=5)
    assert len(chunks) == 5 and all(len(c) == 16 for c in chunks)
    assert chunks[1] == tokenizer(TEXT, add_special_tokens=False)["input_ids"][16:32]
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:  # one window at a time, by hand
            logits = model(input_ids=torch.tensor([chunk])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            nll -= sum(logp[i, chunk[i + 1]].item() for i in range(len(chunk) - 1))
            count += len(chunk) - 1
    assert perplexity(model, chunks, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_general_text_reads_txt_and_jsonl_and_refuses_a_short_one(tmp_path, tiny_model_dir):
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert read_text(tmp_path / "g.jsonl") == "a b\n\nc"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ILoRAError, match=r"bad.jsonl:1: expected an object with a string 'text'"):
        read_text(tmp_path / "bad.jsonl")
    with pytest.raises(ILoRAError, match="fewer than one window of 64"):
        windows("short", AutoTokenizer.from_pretrained(tiny_model_dir), window=64, count=2)


def test_a_run_reports_general_perplexity_before_and_after_each_task(tiny_model_dir, tmp_path):
    (tmp_path / "general.txt").write_text(TEXT)
    config = two_task_config(
        tmp_path,
        tiny_model_dir,
        max_steps=2,
        learning_rate=0.05,
        general="general.txt",
        general_windows=3,
        cutoff_len=32,
        bf16=False,
        output_dir=str(tmp_path / "out"),
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    run = tmp_path / "out" / "ilora"
    summary = json.loads((run / "metrics.json").read_text())
    general = summary["general"]
    assert general["windows"] == 3 and general["tokens"] == 96
    assert set(general["perplexity"]) == {"plastic", "stable"} and all(
        len(v) == 2 for v in general["perplexity"].values()
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chunks = windows(TEXT, AutoTokenizer.from_pretrained(tiny_model_dir), 32, 3)
    assert general["base"] == pytest.approx(perplexity(base, chunks), rel=1e-6)
    assert general["perplexity"]["plastic"][-1] != pytest.approx(general["base"], rel=1e-6)  # training moved it
    report = (run / "report.md").read_text()
    assert "General ability: perplexity on general.txt" in report and (run / "general.png").is_file()
    (tmp_path / "general.txt").write_text(TEXT + " more")  # a changed general text: the run is stale
    assert main(["run", str(tmp_path / "run.yaml")]) == 2
