"""Every bad input is one line on stderr naming the culprit, exit code 2, no traceback, nothing written."""

import json

import pytest
import yaml
from helpers import first_task
from tiny import tiny_llama, tiny_tokenizer, write_jsonl

from ilora.cli import main

TRAIN = [
    "--lora_target",
    "q_proj,v_proj",
    "--lora_rank",
    "4",
    "--max_steps",
    "2",
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--disable_tqdm",
    "true",
    "--ilora_buffer_size",
    "4",
]


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A valid model, data, one finished task and a valid run config; each case breaks one thing."""
    root = tmp_path_factory.mktemp("world")
    data, _ = first_task(root, tiny_model_dir, TRAIN)
    other = root / "other-model"
    tiny_llama(seed=9).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    (root / "incomplete").mkdir()
    return {"root": root, "model": tiny_model_dir, "data": data, "t1": root / "t1", "other": other}


def train(world, tmp_path, *extra, data=None):
    return [
        "train",
        "--model",
        str(world["model"]),
        "--dataset",
        str(data or world["data"]),
        "--output_dir",
        str(tmp_path / "out"),
        *TRAIN,
        *extra,
    ]


def data_file(tmp_path, content: bytes):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    return path


def run_config(world, tmp_path, change):
    write_jsonl(tmp_path / "a.test.jsonl", [{"prompt": "x", "response": "positive"}])
    settings = {
        "model_name_or_path": str(world["model"]),
        "output_dir": str(tmp_path / "out"),
        "lora_target": "q_proj",
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "tasks": [
            {"name": "a", "train": str(world["data"]), "test": "a.test.jsonl", "choices": ["positive", "negative"]}
        ],
    }
    change(settings)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings) if isinstance(settings, dict) else settings)
    return ["run", str(path)]


def yaml_train(world, tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text.format(model=world["model"], data=world["data"], out=tmp_path / "out"))
    return ["train", str(path)]


CASES = {
    # command-line flags
    "unknown command": (lambda w, t: ["trian"], "unknown command 'trian' (did you mean 'train'?)"),
    "unknown flag": (
        lambda w, t: train(w, t, "--emma_alpha", "0.5"),
        "unknown argument '--emma_alpha' (did you mean '--ema_alpha'?)",
    ),
    "wrong type": (
        lambda w, t: train(w, t, "--lora_rank", "eight"),
        "--lora_rank/--lora-rank: invalid int value: 'eight'",
    ),
    "ema_alpha = 1": (lambda w, t: train(w, t, "--ema_alpha", "1"), "ema_alpha=1.0 must be in [0, 1)"),
    "ema_alpha < 0": (lambda w, t: train(w, t, "--ema_alpha", "-0.1"), "ema_alpha=-0.1 must be in [0, 1)"),
    "negative buffer": (lambda w, t: train(w, t, "--ilora_buffer_size", "-5"), "ilora_buffer_size=-5 must be >= 0"),
    "replay batch 0": (lambda w, t: train(w, t, "--replay_batch_size", "0"), "replay_batch_size=0 must be >= 1"),
    "layer out of range": (
        lambda w, t: train(w, t, "--hidden_state_layers", "0", "5"),
        "hidden_state_layers [5] out of range",
    ),
    "lora dropout": (lambda w, t: train(w, t, "--lora_dropout", "1.5"), "lora_dropout=1.5 must be in [0, 1)"),
    "cutoff_len": (lambda w, t: train(w, t, "--cutoff_len", "1"), "cutoff_len=1 must be >= 2"),
    "task id separator": (
        lambda w, t: train(w, t, "--current_task_id", "a/b"),
        "current_task_id='a/b' is not a valid task id",
    ),
    "task id dotdot": (
        lambda w, t: train(w, t, "--current_task_id", "x..y"),
        "current_task_id='x..y' is not a valid task id",
    ),
    "model missing": (
        lambda w, t: ["train", "--model", str(t / "nope"), "--dataset", str(w["data"]), "--output_dir", str(t / "out")],
        "not a local model directory with config.json",
    ),
    "prev id without prev": (
        lambda w, t: train(w, t, "--prev_task_id", "t1"),
        "prev_task_id is given but previous_task_model is not",
    ),
    # datasets
    "dataset missing": (lambda w, t: train(w, t, data=t / "missing.jsonl"), "missing.jsonl: no such file"),
    "empty dataset": (lambda w, t: train(w, t, data=data_file(t, b"")), "bad.jsonl: no examples"),
    "malformed line": (
        lambda w, t: train(w, t, data=data_file(t, b'{"prompt": "a", "response": "b"}\n{oops\n')),
        "bad.jsonl:2: not valid JSON",
    ),
    "missing response": (
        lambda w, t: train(w, t, data=data_file(t, b'{"prompt": "a"}\n')),
        "bad.jsonl:1: missing 'response'",
    ),
    "missing prompt": (
        lambda w, t: train(w, t, data=data_file(t, b'{"response": "a"}\n')),
        "bad.jsonl:1: missing 'prompt'",
    ),
    "empty response": (
        lambda w, t: train(w, t, data=data_file(t, b'{"prompt": "a", "response": " "}\n')),
        "bad.jsonl:1: 'response' is empty",
    ),
    "non-string field": (
        lambda w, t: train(w, t, data=data_file(t, b'{"prompt": 3, "response": "a"}\n')),
        "bad.jsonl:1: 'prompt' must be a string",
    ),
    "not utf-8": (
        lambda w, t: train(w, t, data=data_file(t, b'{"prompt": "caf\xe9", "response": "a"}\n')),
        "bad.jsonl: not UTF-8 text",
    ),
    # chained tasks and adapters
    "previous missing": (lambda w, t: train(w, t, "--previous_task_model", str(t / "gone")), "gone: no such directory"),
    "previous incomplete": (
        lambda w, t: train(w, t, "--previous_task_model", str(w["root"] / "incomplete")),
        "not a finished ilora task",
    ),
    "prev id mismatch": (
        lambda w, t: train(w, t, "--previous_task_model", str(w["t1"]), "--prev_task_id", "t0"),
        "prev_task_id='t0' but",
    ),
    "lora rank mismatch": (
        lambda w, t: train(w, t, "--previous_task_model", str(w["t1"]), "--lora_rank", "8"),
        "does not match",
    ),
    "lora target mismatch": (
        lambda w, t: train(w, t, "--previous_task_model", str(w["t1"]), "--lora_target", "q_proj"),
        "does not match",
    ),
    "buffer capacity mismatch": (
        lambda w, t: train(w, t, "--previous_task_model", str(w["t1"]), "--ilora_buffer_size", "9"),
        "this task's replay buffer (reservoir, 9 rows) differs from the previous task's (reservoir, 4 rows,",
    ),
    "other base model": (
        lambda w, t: [
            "train",
            "--model",
            str(w["other"]),
            "--dataset",
            str(w["data"]),
            "--output_dir",
            str(t / "out"),
            *TRAIN,
            "--previous_task_model",
            str(w["t1"]),
        ],
        "holds other weights",
    ),
    "finished output dir": (
        lambda w, t: train(w, t)[:5] + ["--output_dir", str(w["t1"])] + TRAIN,
        "already holds a finished task",
    ),
    "nothing to resume": (
        lambda w, t: train(w, t, "--resume_from_checkpoint", "true"),
        "no complete checkpoint to resume from",
    ),
    # YAML configs
    "yaml unknown key": (
        lambda w, t: yaml_train(w, t, "model: {model}\ndataset: {data}\noutput_dir: {out}\nema_alpah: 0.5\n"),
        "unknown key 'ema_alpah' (did you mean 'ema_alpha'?)",
    ),
    "yaml wrong type": (
        lambda w, t: yaml_train(w, t, "model: {model}\ndataset: {data}\noutput_dir: {out}\nema_alpha: fast\n"),
        "--ema_alpha/--ema-alpha: invalid float value: 'fast'",
    ),
    "yaml syntax": (lambda w, t: yaml_train(w, t, "model: [unclosed\n"), "train.yaml: invalid YAML"),
    "yaml not a mapping": (lambda w, t: yaml_train(w, t, "- a\n- b\n"), "expected a mapping"),
    "run unknown method": (
        lambda w, t: run_config(w, t, lambda c: c.update(method="ewk")),
        "method 'ewk' is not one of",
    ),
    "run duplicate tasks": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"].append(dict(c["tasks"][0]))),
        "duplicate task names in the config: ['a']",
    ),
    "run task missing test": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].pop("test")),
        "task 1: missing ['test']",
    ),
    "run bad scoring": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(scoring="bleu")),
        "scoring='bleu' is not one of ('choice', 'exact_match', 'rouge_l', 'edit_similarity')",
    ),
    "run answer not a choice": (
        lambda w, t: run_config(w, t, lambda c: c["tasks"][0].update(choices=["yes", "no"])),
        "a.test.jsonl:1: answer 'positive' is not among the choices",
    ),
    "run tasks not a list": (lambda w, t: run_config(w, t, lambda c: c.update(tasks="a")), "'tasks' must be a list"),
    "run gate on perplexity without a general text": (
        lambda w, t: run_config(w, t, lambda c: c.update(gate_general_ppl=0.05)),
        "gate_general_ppl gates the perplexity on the general text: set general: FILE too",
    ),
    "run gate of negative points": (
        lambda w, t: run_config(w, t, lambda c: c.update(gate_task_drop=-1)),
        "gate_task_drop=-1 must be a finite number of points >= 0",
    ),
    "run override without a value's key": (
        lambda w, t: [*run_config(w, t, lambda c: None), "=5"],
        "'=5': after the config, give overrides as key=value",
    ),
    "run override of an unknown key": (
        lambda w, t: [*run_config(w, t, lambda c: None), "lerning_rate=0.1"],
        "unknown key 'lerning_rate' (did you mean 'learning_rate'?)",
    ),
    "run override given twice": (
        lambda w, t: [*run_config(w, t, lambda c: None), "seed=1", "seed=2"],
        "seed is overridden twice",
    ),
    "run method given twice": (
        lambda w, t: [*run_config(w, t, lambda c: None), "method=er", "--method", "ewc"],
        "method is given twice",
    ),
    "eval bad adapter": (
        lambda w, t: [
            "eval",
            "--model",
            str(w["model"]),
            "--adapter",
            str(t),
            "--tasks",
            run_config(w, t, lambda c: None)[1],
        ],
        "neither a PEFT adapter directory nor an ilora task directory",
    ),
    "compare not a run": (lambda w, t: ["compare", str(t)], "no metrics.json"),
    # FSDP settings ilora cannot train with: refused before anything is read, in one process too
    "fsdp1": (lambda w, t: train(w, t, "--fsdp", "--fsdp_config", '{"version": 1}'), "FSDP1 flattens parameters"),
    "fsdp full state dict": (
        lambda w, t: train(w, t, "--fsdp", "--fsdp_config", '{"state_dict_type": "FULL_STATE_DICT"}'),
        "fsdp state_dict_type FULL_STATE_DICT",
    ),
    "fsdp one process": (
        lambda w, t: train(w, t, "--fsdp"),
        "fsdp shards over several processes: launch with torchrun",
    ),
    # DeepSpeed runs in fp32 (tests/test_deepspeed.py); the rest is refused before anything loads
    "deepspeed no file": (
        lambda w, t: run_config(w, t, lambda c: c.update(deepspeed="ds_zero2.json")),
        "ds_zero2.json: no such file",
    ),
    "deepspeed bad stage": (
        lambda w, t: train(w, t, "--deepspeed", '{"zero_optimization": {"stage": 4}}'),
        "zero_optimization.stage must be 0, 1, 2 or 3",
    ),
    "deepspeed bf16 config": (
        lambda w, t: train(w, t, "--deepspeed", '{"bf16": {"enabled": true}}'),
        "bf16.enabled true: leave it at auto and set ilora's bf16: true",
    ),
    "deepspeed fp16 config": (
        lambda w, t: train(w, t, "--deepspeed", '{"fp16": {"enabled": true}}'),
        "DeepSpeed's fp16 mode casts the whole model to 16 bits",
    ),
    "deepspeed nvme params": (
        lambda w, t: train(
            w, t, "--deepspeed", '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}'
        ),
        "offload_param to nvme swaps the adapters' partitions out of memory",
    ),
    "deepspeed bad json": (
        lambda w, t: train(w, t, "--deepspeed", '{"zero_optimization": '),
        "--deepspeed: not valid JSON",
    ),
    "deepspeed without a launcher": (
        lambda w, t: train(w, t, "--deepspeed", '{"zero_optimization": {"stage": 2}}'),
        "--deepspeed runs under a launcher that starts its processes",
    ),
    "deepspeed not an object": (
        lambda w, t: run_config(w, t, lambda c: (t / "ds.json").write_text("[2]") and c.update(deepspeed="ds.json")),
        "ds.json: not a JSON object",
    ),
    "fsdp quantized": (
        lambda w, t: train(w, t, "--fsdp", "--quantization_bit", "4"),
        "a quantized base (quantization_bit) does not run under FSDP2",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, tmp_path, capsys):
    make_argv, message = CASES[case]
    argv = make_argv(world, tmp_path)
    t1_manifest = (world["t1"] / "ilora_task.json").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith("ilora")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json")), "partial output written"
    assert (world["t1"] / "ilora_task.json").read_text() == t1_manifest
    json.loads(t1_manifest)


# what `accelerate launch --use_deepspeed ...` exports (accelerate/utils/launch.py): checked before anything loads
# (environment, flags, message)
ACCELERATE_DEEPSPEED = {
    "zero3 olora": (
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
        ["--method", "olora"],
        "method olora under DeepSpeed ZeRO-3",
    ),
    "zero3 quantized": (
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
        ["--quantization_bit", "4"],
        "a quantized base (quantization_bit) does not run under DeepSpeed ZeRO-3",
    ),
    "mixed precision": (
        {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"},
        [],
        "accelerate launch --mixed_precision bf16 with DeepSpeed: ilora trains Accelerate-launched DeepSpeed in fp32",
    ),
    "config file zero3 ewc": (
        {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "{tmp}/ds.json"},
        ["--method", "ewc"],
        "method ewc under DeepSpeed ZeRO-3",
    ),
    "config file missing": (
        {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "{tmp}/none.json"},
        [],
        "none.json: missing (DeepSpeed config)",
    ),
}


@pytest.mark.parametrize("case", list(ACCELERATE_DEEPSPEED))
def test_an_accelerate_launched_deepspeed_ilora_cannot_train_is_one_line(case, world, tmp_path, capsys, monkeypatch):
    env, flags, message = ACCELERATE_DEEPSPEED[case]
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", **env}.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    capsys.readouterr()
    assert main(train(world, tmp_path, *flags)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()
