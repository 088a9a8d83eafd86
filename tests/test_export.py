"""`ilora export`: merged and unmerged, from a task and from a run, loaded back and compared."""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from tiny import sentiment_rows, two_task_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from ilora.cli import main

COMMON = [
    "--lora_target",
    "q_proj,v_proj",
    "--lora_rank",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--report_to",
    "none",
    "--ilora_buffer_size",
    "6",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--learning_rate",
    "0.05",
    "--max_steps",
    "3",
]


def train(model_dir, root, name, *extra):
    data = write_jsonl(root / f"{name}.jsonl", sentiment_rows(8, offset=len(name) * 10))
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(root / name),
        "--current_task_id",
        name,
        *COMMON,
        *extra,
    ]
    if "--method" not in extra:  # I-LoRA, with a short EMA horizon: the stable adapter moves in 3 steps
        argv += ["--ema_alpha", "0.5"]
    assert main(argv) == 0
    return root / name


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer(
        ["Review 3: the film was great. Sentiment:", "a dull film"], return_tensors="pt", padding=True
    ).input_ids


def with_adapter(model_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)


@pytest.mark.parametrize("adapter", ["stable", "plastic"])
def test_merged_export_is_a_plain_model_equal_to_base_plus_adapter(adapter, tiny_model_dir, tmp_path, ids):
    task = train(tiny_model_dir, tmp_path, "t1")
    assert main(["export", str(task), "--output", str(tmp_path / "merged"), "--adapter", adapter, "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = logits(with_adapter(tiny_model_dir, task / adapter), ids)
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=0)
    other = "plastic" if adapter == "stable" else "stable"  # the two differ: the test tells them apart
    assert (logits(with_adapter(tiny_model_dir, task / other), ids) - want).abs().max() > 1e-4
    record = json.loads((tmp_path / "merged" / "ilora_export.json").read_text())
    assert record["adapter"] == adapter and record["merged"] and record["method"] == "ilora"


def test_unmerged_export_is_a_clean_peft_adapter_defaulting_to_stable(tiny_model_dir, tmp_path, ids):
    task = train(tiny_model_dir, tmp_path, "t1")
    assert main(["export", str(task), "--output", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert not config.get("modules_to_save") and config["r"] == 4
    exported = with_adapter(config["base_model_name_or_path"], tmp_path / "adapter")
    torch.testing.assert_close(
        logits(exported, ids), logits(with_adapter(tiny_model_dir, task / "stable"), ids), atol=1e-5, rtol=0
    )
    assert json.loads((tmp_path / "adapter" / "ilora_export.json").read_text())["adapter"] == "stable"


def test_olora_exports_the_sum_of_every_tasks_lora_as_one_lora(tiny_model_dir, tmp_path, ids):
    t1 = train(tiny_model_dir, tmp_path, "t1", "--method", "olora")
    t2 = train(tiny_model_dir, tmp_path, "t2", "--method", "olora", "--previous_task_model", str(t1))
    assert main(["export", str(t2), "--output", str(tmp_path / "sum")]) == 0
    assert main(["export", str(t2), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    config = json.loads((tmp_path / "sum" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # two rank-4 LoRAs, the scale alpha / r kept
    both = with_adapter(tiny_model_dir, t2 / "olora-1")
    both.load_adapter(str(t2 / "plastic"), adapter_name="new")
    both.base_model.set_adapter(["default", "new"])
    want = logits(both, ids)
    torch.testing.assert_close(logits(with_adapter(tiny_model_dir, tmp_path / "sum"), ids), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids), want, atol=1e-5, rtol=0
    )
    assert json.loads((tmp_path / "sum" / "ilora_export.json").read_text())["adapters_summed"] == ["olora-1", "plastic"]


def test_a_run_exports_its_last_task_and_best_adapter_with_its_provenance(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(two_task_config(tmp_path, tiny_model_dir, max_steps=2, output_dir=str(tmp_path / "out")))
    )
    assert main(["run", str(config)]) == 0
    run = tmp_path / "out" / "ilora"
    summary = json.loads((run / "metrics.json").read_text())
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    record = json.loads((tmp_path / "export" / "ilora_export.json").read_text())
    aps = {a: summary["metrics"][a]["AP"] for a in ("plastic", "stable")}
    assert record["adapter"] == ("plastic" if aps["plastic"] > aps["stable"] else "stable")
    assert record["task_id"] == "beta" and record["metrics"]["tasks"] == ["alpha", "beta"]
    assert record["metrics"]["final_accuracy"] == summary["matrices"][record["adapter"]][-1]


@pytest.mark.parametrize("case", ["output not empty", "unknown adapter", "not a task", "wrong base"])
def test_bad_export_input_is_one_line_and_writes_nothing(case, tiny_model_dir, tmp_path, capsys):
    from tiny import save_tiny_model

    task = train(tiny_model_dir, tmp_path, "t1", "--method", "er")
    out = tmp_path / "out"
    argv = ["export", str(task), "--output", str(out)]
    if case == "output not empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        expected = "not empty"
    elif case == "unknown adapter":
        argv += ["--adapter", "stabel"]
        expected = "offers ['plastic']"
    elif case == "not a task":
        argv[1] = str(tmp_path)
        expected = "neither a finished ilora task directory"
    else:
        argv += ["--model", str(save_tiny_model(tmp_path / "other", seed=9))]
        expected = "holds other weights"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists() or [p.name for p in out.iterdir()] == ["mine.txt"]


def test_serve_writes_every_tasks_models_as_adapters_that_load_together_on_one_base(tiny_model_dir, tmp_path, ids):
    """`--serve`: each task's plastic and stable adapters, `<task>-<model>`, with serve.json and the vllm
    command; two of them loaded on one base with PEFT's multi-adapter API each give that task's model."""
    from ilora.methods.base import evaluating
    from ilora.pipeline.models import open_task

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(two_task_config(tmp_path, tiny_model_dir, max_steps=3, output_dir=str(tmp_path / "out")))
    )
    assert main(["run", str(config)]) == 0
    run = tmp_path / "out" / "ilora"
    assert main(["export", str(run), "--serve", str(tmp_path / "serve")]) == 0
    served = json.loads((tmp_path / "serve" / "serve.json").read_text())
    names = [a["name"] for a in served["adapters"]]
    assert names == ["alpha-plastic", "alpha-stable", "beta-plastic", "beta-stable"]
    summary = json.loads((run / "metrics.json").read_text())
    assert served["adapters"][2]["accuracy"] == dict(zip(summary["tasks"], summary["matrices"]["plastic"][2]))
    assert served["base"] == str(tiny_model_dir.resolve())
    assert served["command"].startswith(f"vllm serve {served['base']} --enable-lora --max-lora-rank 8 --max-loras 4")
    assert "alpha-stable=alpha-stable" in served["command"]

    both = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "serve" / "alpha-stable", adapter_name="a"
    )
    both.load_adapter(str(tmp_path / "serve" / "beta-plastic"), adapter_name="b")
    for adapter, folder, model in (("a", "1-alpha", "stable"), ("b", "2-beta", "plastic")):
        both.set_adapter(adapter)
        task = open_task(run / "tasks" / folder)
        with evaluating(task.method, task.model, model, task.options):
            want = logits(task.model, ids)
        torch.testing.assert_close(logits(both, ids), want, atol=1e-5, rtol=0)
    assert (logits(both, ids) - logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)).abs().max() > 1e-4


def test_serve_takes_a_run_and_copies_the_base_when_asked(tiny_model_dir, tmp_path, capsys):
    task = train(tiny_model_dir, tmp_path, "t1")
    capsys.readouterr()
    assert main(["export", str(task), "--serve", str(tmp_path / "serve")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err and not (tmp_path / "serve").exists()
    config = tmp_path / "run.yaml"
    settings = two_task_config(tmp_path, tiny_model_dir, max_steps=1, method="er", output_dir=str(tmp_path / "out"))
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", str(config)]) == 0
    assert main(["export", str(tmp_path / "out" / "er"), "--serve", str(tmp_path / "serve"), "--copy_base"]) == 0
    served = json.loads((tmp_path / "serve" / "serve.json").read_text())
    assert served["base"] == "base" and (tmp_path / "serve" / "base" / "config.json").is_file()
    assert [a["name"] for a in served["adapters"]] == ["alpha-plastic", "beta-plastic"]
