"""The hooks for methods that are not "a loss term plus adapters summed in the forward", each held to its
contract with a small method that uses it (tests/toy_methods.py): a start-of-task hook that sees the
task's rows, a trainable-tensors hook, and an evaluated model built from dense weights."""

import json
import shutil

import pytest
import torch
from helpers import TOKENIZER, lora
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tiny import sentiment_rows, tiny_llama, write_jsonl
from toy_methods import DesignedDown
from transformers import AutoModelForCausalLM, TrainingArguments

from ilora import ContinualArguments, ILoRATrainer, methods
from ilora.cli import main
from ilora.core.adapters import AdapterPair
from ilora.data.encode import encode_rows
from ilora.errors import ILoRAError
from ilora.methods.base import evaluating


@pytest.fixture
def toys():
    methods.register("toy_designed", "toy_methods:DesignedDown")
    methods.register("toy_doubled", "toy_methods:Doubled")
    DesignedDown.calls.clear()
    yield
    methods.unregister("toy_designed")
    methods.unregister("toy_doubled")


def trainer(tmp_path, method, **training) -> ILoRATrainer:
    settings = dict(per_device_train_batch_size=4, learning_rate=0.05, max_steps=4, seed=0, save_strategy="no")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True, **{**settings, **training}
    )
    return ILoRATrainer(
        model=tiny_llama(),
        args=args,
        continual_args=ContinualArguments(method=method),
        peft_config=lora(),
        train_dataset=encode_rows(sentiment_rows(16), TOKENIZER, 64, False),
        processing_class=TOKENIZER,
    )


def test_the_start_of_task_hook_sees_the_tasks_rows_in_order_before_the_first_step(toys, tmp_path):
    ilora = trainer(tmp_path, "toy_designed")
    ilora.train()
    [call] = DesignedDown.calls
    expected = [row["input_ids"] for row in encode_rows(sentiment_rows(16), TOKENIZER, 64, False)]
    assert call["rows"] == expected and call["step"] == 0  # every row, in file order, before any step


def test_only_the_trainable_tensors_train_and_reach_the_optimizer(toys, tmp_path):
    ilora = trainer(tmp_path, "toy_designed")
    pair = ilora.method.adapters
    ilora.create_optimizer()
    in_optimizer = {id(p) for group in ilora.optimizer.param_groups for p in group["params"]}
    b_tensors = {id(t) for t, slot in zip(pair.plastic, pair.slots) if slot == "lora_B"}
    assert in_optimizer == b_tensors and b_tensors
    ilora.train()
    pair = AdapterPair(ilora.model)
    designed = [t.detach().clone() for t, slot in zip(pair.plastic, pair.slots) if slot == "lora_A"]
    ilora2 = trainer(tmp_path / "again", "toy_designed")  # the same rows: the same design, before training
    ilora2.method.start_of_task(ilora2.task_batches())
    pair2 = ilora2.method.adapters
    before = [t for t, slot in zip(pair2.plastic, pair2.slots) if slot == "lora_A"]
    assert all(torch.equal(a, b) for a, b in zip(designed, before)), "a frozen lora_A moved while training"
    moved = [not torch.equal(t, u) for t, u, slot in zip(pair.plastic, pair2.plastic, pair.slots) if slot == "lora_B"]
    assert all(moved), "an up-projection did not train"


def test_a_resumed_task_does_not_design_again_and_ends_bitwise_equal(toys, tmp_path):
    clean = trainer(tmp_path / "clean", "toy_designed", save_strategy="steps", save_steps=2)
    clean.train()
    clean.save_task(tmp_path / "clean" / "out")
    killed = tmp_path / "killed" / "out"
    shutil.copytree(tmp_path / "clean" / "out" / "checkpoint-2", killed / "checkpoint-2")
    DesignedDown.calls.clear()
    resumed = trainer(tmp_path / "killed", "toy_designed", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert DesignedDown.calls == []  # its design is in the checkpoint
    resumed.save_task(killed)
    a = load_file(str(tmp_path / "clean" / "out" / "plastic" / "adapter_model.safetensors"))
    b = load_file(str(killed / "plastic" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def doubled_reference(model):
    """The model with every plastic lora_B doubled: base + 2 x the plastic weight change."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and "plastic" in layer.lora_B:
            layer.lora_B["plastic"].weight.data *= 2
    return model


def test_merged_weights_make_the_evaluated_model_and_restore_the_base_after(toys, tmp_path):
    ilora = trainer(tmp_path, "toy_doubled")
    ilora.train()
    model = ilora.model.eval()
    ids = torch.tensor([encode_rows(sentiment_rows(2), TOKENIZER, 64, False)[0]["input_ids"]])
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad(), evaluating(methods.get("toy_doubled"), model, "plastic", None):
        evaluated = model(input_ids=ids).logits
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if n in base_weights)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        reference = doubled_reference(model)(input_ids=ids).logits
    torch.testing.assert_close(evaluated, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(evaluated, plain, atol=1e-4)  # not the sum of adapters


def test_a_merged_weights_method_exports_merged_only(toys, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(8))
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "t1")]
    argv += ["--method", "toy_doubled", "--lora_target", "q_proj,v_proj", "--lora_rank", "4", "--max_steps", "3"]
    argv += ["--learning_rate", "0.05", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "t1"), "--output", str(tmp_path / "adapter")]) == 2
    assert "is not a sum of LoRA adapters: export it with --merge" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()
    assert main(["export", str(tmp_path / "t1"), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    record = json.loads((tmp_path / "merged" / "ilora_export.json").read_text())
    assert record["adapters_summed"] is None and record["merged"]
    from ilora.pipeline.models import open_task

    task = open_task(tmp_path / "t1")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        reference = doubled_reference(task.model.eval())(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, atol=1e-5, rtol=0)


def test_an_unregistered_or_doubly_registered_method_is_one_line(toys):
    with pytest.raises(ILoRAError, match="registered already"):
        methods.register("er", "toy_methods:Doubled")
    with pytest.raises(ILoRAError, match="was not registered with register"):
        methods.unregister("er")
    with pytest.raises(ILoRAError, match="give the class as 'module:Class'"):
        methods.register("x", "toy_methods")
