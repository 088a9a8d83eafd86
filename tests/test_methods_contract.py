"""The contract every registered method keeps, PEFT-style: one table of methods crossed with one set of
checks on the tiny model. A method added to `ilora.methods.REGISTRY` without a row here fails
`test_every_registered_method_is_in_the_table`."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import sentiment_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from ilora import ILoRAArguments, ILoRATrainer, methods
from ilora.cli import main
from ilora.config.parse import ModelArguments
from ilora.pipeline.workflow import lora_config

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
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--learning_rate",
    "0.01",
    "--ema_alpha",
    "0.8",
    "--max_steps",
    "4",
    "--seed",
    "3",
]

# method: (its flags in these tests, adapters besides plastic that may change while it trains,
#          a bad argument of its own, the words its one-line refusal must contain)
CASES = {
    "seq_lora": ([], set(), ["--ilora_buffer_size", "-1"], "ilora_buffer_size=-1"),
    "er": ([], set(), ["--replay_batch_size", "0"], "replay_batch_size=0"),
    "joint": ([], set(), ["--ilora_buffer_size", "-1"], "ilora_buffer_size=-1"),
    "ilora": ([], {"stable"}, ["--consistency_target", "maxx"], "consistency_target='maxx'"),
    "ewc": (["--ewc_fisher_samples", "6", "--ewc_lambda", "100"], set(), ["--ewc_gamma", "1.5"], "ewc_gamma=1.5"),
    "lwf": ([], set(), ["--lwf_temperature", "0"], "lwf_temperature=0"),
    "derpp": (["--derpp_top_k", "8"], set(), ["--derpp_top_k", "0"], "derpp_top_k=0"),
    "olora": (["--olora_lambda2", "0.01"], set(), ["--olora_lambda1", "-2"], "olora_lambda1=-2"),
}


def test_every_registered_method_is_in_the_table():
    assert set(CASES) == set(methods.names())


def train(model_dir, tmp, name, method, *extra, task="", rows=12):
    """Task `name` (its data: `task`'s rows, default its own) through the CLI."""
    task = task or name
    data = write_jsonl(tmp / f"{task}.jsonl", sentiment_rows(rows, offset=40 * len(task)))
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp / name),
        "--method",
        method,
        "--current_task_id",
        name,
        *COMMON,
        *CASES[method][0],
        *extra,
    ]
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


def second_task_trainer(tiny_model_dir, t1, method, out) -> ILoRATrainer:
    """Task t2 chained on t1, in process, so its tensors can be watched."""
    options_cls = methods.get(method).Arguments
    flags = dict(zip(CASES[method][0][::2], CASES[method][0][1::2]))
    options = (
        options_cls(**{k[2:]: type(getattr(options_cls(), k[2:]))(v) for k, v in flags.items()})
        if options_cls
        else None
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=0.01,
        max_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
    )
    return ILoRATrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        ilora_args=ILoRAArguments(
            method=method, ilora_buffer_size=6, ema_alpha=0.8, previous_task_model=str(t1), current_task_id="t2"
        ),
        peft_config=lora_config(ModelArguments(lora_rank=4, lora_target="q_proj,v_proj")),
        train_dataset=sentiment_rows(12, offset=200),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        method_options=options,
    )


@pytest.mark.parametrize("method", list(CASES))
class TestMethodContract:
    def test_two_task_chain_writes_loadable_task_directories_and_moves_only_its_tensors(
        self, method, first_tasks, tiny_model_dir, tmp_path
    ):
        t1 = first_tasks(method)
        trainer = second_task_trainer(tiny_model_dir, t1, method, tmp_path / "t2")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
        allowed = {"plastic"} | CASES[method][1]
        assert moved, "nothing trained"
        strays = [n for n in moved if not any(f".{a}." in n for a in allowed)]
        assert not strays, f"{method} changed tensors it does not train: {strays[:3]}"
        assert any(".plastic." in n for n in moved)
        trainer.save_task(tmp_path / "t2")

        manifest = json.loads((tmp_path / "t2" / "ilora_task.json").read_text())
        assert manifest["method"] == method and manifest["prev_task_id"] == "t1"
        expected = set(methods.get(method).saved_adapters(trainer.ilora_args))
        if method == "olora":
            expected |= {"olora-1"}  # t1's LoRA, frozen, kept beside t2's
        assert set(manifest["adapters"]) == expected
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        fresh = {n: p.clone() for n, p in base.named_parameters()}
        for name, path in manifest["adapters"].items():
            loaded = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "t2" / path
            )
            saved = load_file(str(tmp_path / "t2" / path / "adapter_model.safetensors"))
            assert saved and all(torch.isfinite(t).all() for t in saved.values()), name
            assert loaded.peft_config["default"].r == 4
        for n, p in trainer.model.get_base_model().named_parameters():  # the base never changes
            if "lora_" not in n:
                assert torch.equal(p, fresh[n.replace(".base_layer", "")]), n

    def test_resume_after_a_kill_ends_bitwise_equal(self, method, first_tasks, tiny_model_dir, tmp_path):
        """A run killed after checkpoint 2 (its later checkpoints and outputs gone) and resumed ends with
        the adapters, buffer and method state of the uninterrupted run."""
        t1 = first_tasks(method)
        chained = ["--previous_task_model", str(t1), "--save_steps", "2", "--save_strategy", "steps"]
        assert train(tiny_model_dir, tmp_path, "t2", method, *chained) == 0
        clean, killed = tmp_path / "t2", tmp_path / "t2-killed"
        shutil.copytree(clean / "checkpoint-2", killed / "checkpoint-2")
        assert (
            train(
                tiny_model_dir,
                tmp_path,
                "t2-killed",
                method,
                *chained,
                "--resume_from_checkpoint",
                "true",
                "--current_task_id",
                "t2",
                task="t2",
            )
            == 0
        )
        for name, path in json.loads((clean / "ilora_task.json").read_text())["adapters"].items():
            a, b = (
                load_file(str(clean / path / "adapter_model.safetensors")),
                load_file(str(killed / path / "adapter_model.safetensors")),
            )
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
        for extra in ("method_state.safetensors", "buffer/buffer.safetensors"):
            if (clean / extra).exists():
                a, b = load_file(str(clean / extra)), load_file(str(killed / extra))
                assert all(torch.equal(a[k], b[k]) for k in a), extra

    def test_its_bad_argument_is_a_one_line_refusal(self, method, tiny_model_dir, tmp_path, capsys):
        flag, message = CASES[method][2], CASES[method][3]
        assert train(tiny_model_dir, tmp_path, "t1", method, *flag) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "t1").exists()


def test_an_option_of_another_method_is_refused(tiny_model_dir, tmp_path, capsys):
    assert train(tiny_model_dir, tmp_path, "t1", "er", "--ewc_lambda", "3") == 2
    assert "ewc_lambda=3.0 applies to method ewc, not er" in capsys.readouterr().err


def test_a_chained_task_keeps_the_method(first_tasks, tiny_model_dir, tmp_path, capsys):
    t1 = first_tasks("er")
    assert train(tiny_model_dir, tmp_path, "t2", "ilora", "--previous_task_model", str(t1)) == 2
    assert "trained with method 'er'" in capsys.readouterr().err
