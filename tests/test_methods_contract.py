"""The contract every registered method keeps, PEFT-style: one table of methods crossed with one set of
checks on the tiny model. A method added to `ilora.methods.REGISTRY` without a row here fails
`test_every_registered_method_is_in_the_table`; the per-engine tests (FSDP2, DeepSpeed, resume) select
their methods from this table too."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tiny import sentiment_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from ilora import ILoRATrainer, methods
from ilora.cli import main
from ilora.config.arguments import ContinualArguments, ModelArguments
from ilora.errors import ILoRAError
from ilora.methods.ilora import EASYCL_NAMES
from ilora.pipeline.models import lora_config
from ilora.runtime import policy

COMMON = {
    "lora_target": "q_proj,v_proj",
    "lora_rank": 4,
    "per_device_train_batch_size": 4,
    "report_to": "none",
    "ilora_buffer_size": 6,
    "disable_tqdm": True,
    "use_cpu": True,
    "learning_rate": 0.01,
    "max_steps": 4,
    "seed": 3,
}


@dataclasses.dataclass
class Case:
    options: dict  # the method's own options in these tests
    moves: set  # adapters besides plastic that may change while it trains
    bad: dict  # a bad option of its own ...
    refusal: str  # ... and the words its one-line refusal must contain
    terms: set  # what it logs besides the loss (in a chained task)
    engines: tuple = ()  # the 2-process engines this method runs under in the suite (the rest: make test-all)


CE = {"ce_loss"}
CASES = {
    "seq_lora": Case({}, set(), {"ilora_buffer_size": -1}, "ilora_buffer_size=-1", CE),
    "er": Case({}, set(), {"replay_batch_size": 0}, "replay_batch_size=0", CE),
    "joint": Case({}, set(), {"ilora_buffer_size": -1}, "ilora_buffer_size=-1", CE),
    "ilora": Case(
        {"ema_alpha": 0.8},
        {"stable"},
        {"ilora_consistency_target": "maxx"},
        "ilora_consistency_target='maxx'",
        CE | {"consistency_loss"},
        engines=("ddp", "fsdp2", "zero2", "zero3"),
    ),
    "ewc": Case(
        {"ewc_fisher_samples": 6, "ewc_lambda": 100},
        set(),
        {"ewc_gamma": 1.5},
        "ewc_gamma=1.5",
        CE | {"ewc_penalty"},
        engines=("fsdp2",),
    ),
    "lwf": Case({}, set(), {"lwf_temperature": 0}, "lwf_temperature=0", CE | {"distillation_loss"}),
    "derpp": Case(
        {"derpp_top_k": 8},
        set(),
        {"derpp_top_k": 0},
        "derpp_top_k=0",
        CE | {"logit_mse", "replay_ce_loss"},
        engines=("zero2",),
    ),
    "olora": Case(
        {"olora_lambda2": 0.01}, set(), {"olora_lambda1": -2}, "olora_lambda1=-2", CE | {"orthogonality_loss"}
    ),
    "nlora": Case({"nlora_lambda1": 0.1}, set(), {"nlora_lambda1": -1}, "nlora_lambda1=-1", CE | {"sparsity_loss"}),
    "inflora": Case({"inflora_threshold": 0.9}, set(), {"inflora_threshold": 1.5}, "inflora_threshold=1.5", CE),
    "magmax": Case({"magmax_scaling": 0.8}, set(), {"magmax_scaling": 0}, "magmax_scaling=0", CE),
}


def methods_under(engine: str) -> list[str]:
    """The methods whose runs under `engine` are in the suite (make test-all runs every method)."""
    return [name for name, case in CASES.items() if engine in case.engines]


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", str(value).lower())]


def test_every_registered_method_is_in_the_table_and_the_full_benchmark():
    from ilora.pipeline.demo import FULL

    assert set(CASES) == set(methods.names()) == set(FULL["methods"])


def test_option_names_are_disjoint_and_carry_their_method_or_are_easycl_names():
    shared = {f.name for f in dataclasses.fields(ContinualArguments)}
    owners: dict[str, str] = {}
    for name, cls in methods.argument_classes().items():
        for field in dataclasses.fields(cls) if cls else ():
            assert field.name not in owners and field.name not in shared, f"{field.name} is declared twice"
            owners[field.name] = name
            assert field.name.startswith(f"{name}_") or field.name in EASYCL_NAMES, (name, field.name)
    # EasyCL's twelve names, every one of them still a key: the shared ones and I-LoRA's own
    assert set(EASYCL_NAMES) <= shared | {k for k, m in owners.items() if m == "ilora"}


def train(model_dir, tmp, name, method, *extra, task="", rows=12):
    """Task `name` (its data: `task`'s rows, default its own) through the CLI."""
    task = task or name
    data = write_jsonl(tmp / f"{task}.jsonl", sentiment_rows(rows, offset=40 * len(task)))
    argv = ["train", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(tmp / name)]
    argv += ["--method", method, "--current_task_id", name, *flags(COMMON), *flags(CASES[method].options), *extra]
    return main(argv)


@pytest.fixture(scope="module")
def first_tasks(tiny_model_dir, tmp_path_factory):
    """Task t1 of each method, trained once for the module."""
    done = {}

    def get(method):
        if method not in done:
            tmp = tmp_path_factory.mktemp(f"first-{method}")
            assert train(tiny_model_dir, tmp, "t1", method, "--save_strategy", "no") == 0
            done[method] = tmp / "t1"
        return done[method]

    return get


def second_task_trainer(tiny_model_dir, t1, method, out, **training) -> ILoRATrainer:
    """Task t2 chained on t1, in process, so its tensors can be watched."""
    options_cls = methods.get(method).Arguments
    settings = dict(per_device_train_batch_size=4, learning_rate=0.01, max_steps=4, save_strategy="no", seed=3)
    args = TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, **{**settings, **training}
    )
    continual = ContinualArguments(
        method=method, ilora_buffer_size=6, previous_task_model=str(t1), current_task_id="t2"
    )
    return ILoRATrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        continual_args=continual,
        method_options=options_cls(**CASES[method].options) if options_cls else None,
        peft_config=lora_config(ModelArguments(lora_rank=4, lora_target="q_proj,v_proj")),
        train_dataset=sentiment_rows(12, offset=200),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )


def adapter_owners(model) -> dict[int, str]:
    """Each LoRA tensor's adapter, found through PEFT's LoRA layers (module, slot, adapter)."""
    owners = {}
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for slot in layer.adapter_layer_names:
                for adapter, part in (getattr(layer, slot, None) or {}).items():
                    tensors = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
                    owners.update({id(t): adapter for t in tensors})
    return owners


@pytest.mark.parametrize("method", list(CASES))
class TestMethodContract:
    def test_two_task_chain_writes_loadable_task_directories_and_moves_only_its_tensors(
        self, method, first_tasks, tiny_model_dir, tmp_path
    ):
        t1 = first_tasks(method)
        trainer = second_task_trainer(tiny_model_dir, t1, method, tmp_path / "t2")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        owners = adapter_owners(trainer.model)
        moved = {n: p for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
        assert any(owners.get(id(p)) == "plastic" for p in moved.values()), "nothing trained"
        allowed = {"plastic"} | CASES[method].moves
        strays = [n for n, p in moved.items() if owners.get(id(p)) not in allowed]  # the base has no owner
        assert not strays, f"{method} changed tensors it does not train: {strays[:3]}"
        trainer.save_task(tmp_path / "t2")

        manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
        assert manifest["method"] == method and manifest["prev_task_id"] == "t1"
        t1_saved = json.loads((t1 / "ilora_task.json").read_text())["adapters"]
        assert set(manifest["adapters"]) == set(methods.get(method).saved_adapters(trainer.method_options, t1_saved))
        in_memory = {}
        for layer_name, layer in trainer.model.named_modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.lora_A:
                    in_memory[(layer_name, adapter)] = layer.lora_B[adapter].weight.detach()
        for name, path in manifest["adapters"].items():
            loaded = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "t2" / path
            )
            saved = load_file(str(tmp_path / "t2" / path / "adapter_model.safetensors"))
            assert saved and all(torch.isfinite(t).all() for t in saved.values()), name
            for layer_name, layer in loaded.named_modules():
                if isinstance(layer, LoraLayer):  # the saved weights are the trained model's, adapter by adapter
                    torch.testing.assert_close(layer.lora_B["default"].weight, in_memory[(layer_name, name)])

    def test_resume_after_a_kill_ends_bitwise_equal(self, method, first_tasks, tiny_model_dir, tmp_path):
        """A run killed after checkpoint 2 (its later checkpoints and outputs gone) and resumed ends with
        the adapters, buffer and method state of the uninterrupted run."""
        assert_resumed_task_equals_uninterrupted(tiny_model_dir, tmp_path, method, first_tasks(method))

    def test_its_bad_argument_is_a_one_line_refusal(self, method, tiny_model_dir, tmp_path, capsys):
        case = CASES[method]
        assert train(tiny_model_dir, tmp_path, "t1", method, *flags(case.bad)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and case.refusal in err, err
        assert not (tmp_path / "t1").exists()

    def test_every_other_methods_option_is_refused(self, method, tiny_model_dir, tmp_path, capsys):
        """An option only another method reads does nothing here: `ilora train` refuses it in one line."""
        for other, case in CASES.items():
            own = {k: v for k, v in case.options.items() if other != method}
            for key, value in own.items():
                assert train(tiny_model_dir, tmp_path, "t1", method, f"--{key}", str(value)) == 2, (other, key)
                err = capsys.readouterr().err.strip()
                assert f"applies to method {other}, not {method}" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "t1").exists()

    def test_eval_and_export_open_its_task_directory(self, method, first_tasks, tiny_model_dir, tmp_path, capsys):
        t1 = first_tasks(method)
        config = tmp_path / "tasks.yaml"
        write_jsonl(tmp_path / "test.jsonl", sentiment_rows(6, offset=500))
        task = {"name": "t1", "train": "test.jsonl", "test": "test.jsonl", "choices": ["positive", "negative"]}
        config.write_text(json.dumps({"tasks": [task], "use_cpu": True, "disable_tqdm": True}))
        capsys.readouterr()
        assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(t1), "--tasks", str(config)]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert set(scores) == set(methods.get(method).reports(None))
        assert all(0.0 <= s["t1"] <= 1.0 for s in scores.values())
        assert main(["export", str(t1), "--output", str(tmp_path / "merged"), "--merge"]) == 0
        assert (tmp_path / "merged" / "config.json").is_file()
        cls = methods.get(method)
        if cls.merges_into_base:  # its default model is dense: an adapter export is refused in one line
            capsys.readouterr()
            assert main(["export", str(t1), "--output", str(tmp_path / "adapter")]) == 2
            err = capsys.readouterr().err.strip()
            assert "export it with --merge" in err and len(err.splitlines()) == 1
            assert not (tmp_path / "adapter").exists()
            assert main(["export", str(t1), "--output", str(tmp_path / "adapter"), "--adapter", "plastic"]) == 0
        else:
            assert main(["export", str(t1), "--output", str(tmp_path / "adapter")]) == 0
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    def test_its_logged_terms_are_finite_and_reach_the_trainers_log(
        self, method, first_tasks, tiny_model_dir, tmp_path
    ):
        trainer = second_task_trainer(tiny_model_dir, first_tasks(method), method, tmp_path, logging_steps=2)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logs) == 2
        for entry in logs:
            assert CASES[method].terms <= set(entry), (method, sorted(entry))
            assert all(math.isfinite(v) for k, v in entry.items() if isinstance(v, float)), entry

    def test_whole_parameter_terms_are_refused_under_zero3_exactly_when_declared(self, method):
        cls = methods.get(method)
        if cls.uses_whole_parameters or cls.merges_into_base:
            with pytest.raises(ILoRAError, match=f"method {method} under DeepSpeed ZeRO-3"):
                policy.check_zero3(cls, quantized=False)
        else:
            policy.check_zero3(cls, quantized=False)

    def test_a_merged_evaluation_is_refused_under_fsdp2_exactly_when_declared(self, method):
        cls = methods.get(method)
        if cls.merges_into_base:
            with pytest.raises(ILoRAError, match=f"method {method} under FSDP2"):
                policy.check_fsdp(2, "SHARDED_STATE_DICT", False, cls)
        else:
            policy.check_fsdp(2, "SHARDED_STATE_DICT", False, cls)


def assert_resumed_task_equals_uninterrupted(model_dir, tmp_path, method, t1, *extra) -> None:
    """Task t2 chained on `t1`, killed after checkpoint 2 and resumed, ends as the uninterrupted t2: its
    adapters, buffer (rows and state) and method state."""
    chained = ["--previous_task_model", str(t1), "--save_steps", "2", "--save_strategy", "steps", *extra]
    assert train(model_dir, tmp_path, "t2", method, *chained) == 0
    clean, killed = tmp_path / "t2", tmp_path / "t2-killed"
    shutil.copytree(clean / "checkpoint-2", killed / "checkpoint-2")
    resumed = [*chained, "--resume_from_checkpoint", "true", "--current_task_id", "t2"]
    assert train(model_dir, tmp_path, "t2-killed", method, *resumed, task="t2") == 0
    for name, path in json.loads((clean / "ilora_task.json").read_text())["adapters"].items():
        a = load_file(str(clean / path / "adapter_model.safetensors"))
        b = load_file(str(killed / path / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    for extra_file in ("method_state.safetensors", "buffer/buffer.safetensors"):
        if (clean / extra_file).exists():
            a, b = load_file(str(clean / extra_file)), load_file(str(killed / extra_file))
            assert all(torch.equal(a[k], b[k]) for k in a), extra_file
    if (clean / "buffer" / "buffer.json").exists():
        assert (clean / "buffer" / "buffer.json").read_text() == (killed / "buffer" / "buffer.json").read_text()


POLICIES = {
    "surprise": ["--replay_policy", "surprise"],
    "balanced in tokens": ["--replay_policy", "balanced", "--ilora_buffer_size", "0", "--replay_budget_tokens", "150"],
}


@pytest.mark.parametrize("method", ["ilora", "er", "derpp"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_replay_policy_chains_and_resumes_bitwise_equal(method, policy, tiny_model_dir, tmp_path):
    """The buffer's policy state (priorities, arrivals, the tasks seen) travels through the task directory
    and the checkpoint like its rows; the manifest says what the buffer holds."""
    flags_ = POLICIES[policy]
    assert train(tiny_model_dir, tmp_path, "t1", method, "--save_strategy", "no", *flags_) == 0
    record = json.loads((tmp_path / "t1" / "ilora_task.json").read_text())["buffer"]
    assert record["policy"] == flags_[1] and record["budget"]["unit"] == ("tokens" if "tokens" in policy else "rows")
    assert 0 < record["budget"]["used"] <= record["budget"]["capacity"]
    assert_resumed_task_equals_uninterrupted(tiny_model_dir, tmp_path, method, tmp_path / "t1", *flags_)


def test_a_chained_task_keeps_the_method(first_tasks, tiny_model_dir, tmp_path, capsys):
    t1 = first_tasks("er")
    assert train(tiny_model_dir, tmp_path, "t2", "ilora", "--previous_task_model", str(t1)) == 2
    assert "trained with method 'er'" in capsys.readouterr().err
