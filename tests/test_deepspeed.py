"""DeepSpeed through the Trainer's own `deepspeed` setting, 2 CPU processes under torchrun. ZeRO-2: the
engine holds whole parameters, so the run must equal DDP. ZeRO-3: every parameter is partitioned, the EMA
runs on the partitions; the run must equal DDP too, and its stable adapter the closed-form EMA. A killed
run resumes through DeepSpeed's loader with ilora's buffer, EMA step and stable adapter restored
(DeepSpeed's checkpoint leaves the frozen stable adapter out). DeepSpeed's bf16 mode under ZeRO-2: the
stable adapter is put back in fp32, its EMA exact there. fp16, bf16 under ZeRO-3, and under ZeRO-3 EWC,
O-LoRA and a quantized base, are refused in one line (tests/test_bad_input.py, test_precision.py)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_peft_loads, failure, peft_model
from safetensors.torch import load_file
from test_fsdp import (
    TASKS,
    adapter,
    assert_killed_in_each_task_resumes_bitwise,
    assert_method_outputs_equal,
    assert_task_equals_ddp_and_loads,
    baselines,
    config,
    ilora_run,
    method_runs_beside_ddp,
    stage_folders,
    torchrun,
)

from ilora import methods
from ilora.core.adapters import adapter_parameters
from ilora.errors import ILoRAError
from ilora.runtime import sharding

pytest.importorskip("deepspeed")  # `make test` installs it (the deepspeed extra)

ZERO2 = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
}


def deepspeed_config(tmp_path, model_dir, name: str, ds: dict, **settings) -> Path:
    """test_fsdp's two-task config, output in `name`, under DeepSpeed settings `ds` (a file beside it: the
    config's paths are read from its directory)."""
    (tmp_path / f"ds_{name}.json").write_text(json.dumps(ds))
    return config(tmp_path, model_dir, name, deepspeed=f"ds_{name}.json", **settings)


def finished_run(tmp_path_factory, model_dir, name: str, ds: dict, **settings) -> Path:
    root = tmp_path_factory.mktemp(name)
    result = ilora_run(deepspeed_config(root, model_dir, name, ds, **settings))
    assert result.returncode == 0, failure(result)
    return root / name


@pytest.fixture(scope="module")
def zero2_run(tiny_model_dir, tmp_path_factory):
    return finished_run(tmp_path_factory, tiny_model_dir, "zero2", ZERO2, bf16="auto")  # fp32 under DeepSpeed


@pytest.mark.full
def test_a_two_task_zero2_run_equals_ddp_and_saves_loadable_adapters(zero2_run, ddp_run, tiny_model_dir):
    for task in TASKS:
        checkpoint = sorted((zero2_run / "ilora" / "tasks" / task).glob("checkpoint-*"))[-1]
        assert list(checkpoint.glob("global_step*")), "no DeepSpeed checkpoint: DeepSpeed did not run"
        assert (checkpoint / "ilora_adapters_sharded" / ".metadata").is_file()
        assert_task_equals_ddp_and_loads(zero2_run, ddp_run, tiny_model_dir, task)
    manifest = json.loads((zero2_run / "ilora" / "tasks" / TASKS[1] / "ilora_task.json").read_text())
    assert manifest["hardware"]["precision"] == "fp32"  # bf16: auto means fp32 under DeepSpeed


@pytest.fixture(scope="module")
def zero2_bf16_run(tiny_model_dir, tmp_path_factory):
    return finished_run(tmp_path_factory, tiny_model_dir, "bf16", ZERO2, bf16=True)  # bf16.enabled: auto follows it


@pytest.mark.full
def test_a_zero2_bf16_run_keeps_the_stable_adapter_in_fp32_and_saves_loadable_adapters(zero2_bf16_run, tiny_model_dir):
    """DeepSpeed's bf16 mode casts the module (the plastic adapter is saved as it trains, in bf16); the
    stable adapter was put back in fp32 and is written so."""
    for task in TASKS:
        folder = zero2_bf16_run / "ilora" / "tasks" / task
        assert {t.dtype for t in adapter(zero2_bf16_run, task, "plastic").values()} == {torch.bfloat16}
        assert {t.dtype for t in adapter(zero2_bf16_run, task, "stable").values()} == {torch.float32}
        assert json.loads((folder / "ilora_task.json").read_text())["hardware"]["precision"] == "bf16"
        for name in ("plastic", "stable"):
            assert_peft_loads(tiny_model_dir, folder / name)


@pytest.mark.full
def test_under_zero2_bf16_the_stable_adapter_is_the_closed_form_ema_in_fp32(tmp_path):
    """Left in bf16 (as DeepSpeed casts it), the stable adapter misses the closed form by far more than 1e-6."""
    result = torchrun(Path(__file__).parent / "sharded_ema.py", str(tmp_path), "zero2-bf16")
    assert result.returncode == 0, failure(result)
    assert (tmp_path / "closed-form-ema.ok").is_file()


@pytest.mark.full
def test_a_zero2_bf16_run_killed_in_each_task_resumes_bitwise_identical(zero2_bf16_run, tiny_model_dir, tmp_path):
    """Through DeepSpeed's loader, with ilora's adapters, buffer and EMA step restored; the stable adapter
    back in fp32 before its saved values load."""
    assert_killed_in_each_task_resumes_bitwise(
        deepspeed_config(tmp_path, tiny_model_dir, "bf16", ZERO2, bf16=True), zero2_bf16_run
    )


@pytest.mark.parametrize("method", baselines())
def test_a_baseline_under_zero2_matches_ddp(method, tiny_model_dir, tmp_path, ddp_method_run):
    """EWC's Fisher takes per-row gradients with autograd.grad, outside the engine's backward (DeepSpeed's
    gradient hooks must not fire); the others' state (teacher, stored logits, frozen LoRAs) as under DDP."""
    (tmp_path / "ds_zero2.json").write_text(json.dumps(ZERO2))
    runs = method_runs_beside_ddp(
        tmp_path, tiny_model_dir, method, ("zero2", {"deepspeed": "ds_zero2.json"}), ddp_method_run
    )
    for task in stage_folders(runs):
        assert_method_outputs_equal(runs, task, method)


# persistence threshold 0: no tensor is kept whole between forwards, every one lives in its partitions
# (tests/sharded_ema.py runs the other case, DeepSpeed's default, where the tiny model's are all kept)
ZERO3 = {**ZERO2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, tmp_path_factory):
    return finished_run(tmp_path_factory, tiny_model_dir, "zero3", ZERO3)


def test_a_two_task_zero3_run_partitions_equals_ddp_and_saves_loadable_adapters(zero3_run, ddp_run, tiny_model_dir):
    for task in TASKS:
        folder = zero3_run / "ilora" / "tasks" / task
        checkpoint = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        # one model-states file per rank: ZeRO-3 partitioned the parameters (ZeRO-2 writes one, whole)
        assert len(list(checkpoint.glob("global_step*/zero_pp_rank_*_model_states.pt"))) == 2
        assert (checkpoint / "ilora_adapters_sharded" / "adapters.safetensors").is_file()
        assert_task_equals_ddp_and_loads(zero3_run, ddp_run, tiny_model_dir, task)
        for name in ("plastic", "stable"):  # the checkpoint's own PEFT adapters are each the right one, whole
            saved = load_file(str(checkpoint / name / "adapter_model.safetensors"))
            assert all(torch.equal(saved[k], v) for k, v in adapter(zero3_run, task, name).items()), (task, name)


def test_under_zero3_the_stable_adapter_is_the_closed_form_ema_of_the_whole_plastic_one(tmp_path):
    result = torchrun(Path(__file__).parent / "sharded_ema.py", str(tmp_path), "zero3")
    assert result.returncode == 0, failure(result)
    assert (tmp_path / "closed-form-ema.ok").is_file()


@pytest.mark.full
def test_a_zero3_run_killed_in_each_task_resumes_bitwise_identical(zero3_run, tiny_model_dir, tmp_path):
    assert_killed_in_each_task_resumes_bitwise(deepspeed_config(tmp_path, tiny_model_dir, "zero3", ZERO3), zero3_run)


@pytest.mark.parametrize(
    "method",
    baselines(
        refused=[m for m in methods.names() if methods.get(m).uses_whole_parameters or methods.get(m).merges_into_base]
    ),
)
def test_a_baseline_under_zero3_matches_ddp(method, tiny_model_dir, tmp_path, ddp_method_run):
    (tmp_path / "ds_zero3.json").write_text(json.dumps(ZERO3))
    runs = method_runs_beside_ddp(
        tmp_path, tiny_model_dir, method, ("zero3", {"deepspeed": "ds_zero3.json"}), ddp_method_run
    )
    for task in stage_folders(runs):
        assert_method_outputs_equal(runs, task, method)


# what `accelerate launch --use_deepspeed --zero_stage 3` exports: Accelerate's own ZeRO-3 settings
ACCELERATE_ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.full
def test_accelerate_launched_zero3_trains_in_fp32_and_equals_ddp(ddp_run, tiny_model_dir, tmp_path):
    """No `deepspeed` key: the settings come through the environment, and bf16: auto still means fp32.
    Accelerate's plugin activates ZeRO-3 for every later load, rank 0's evaluation models included: they
    must load whole."""
    result = ilora_run(config(tmp_path, tiny_model_dir, "launched", bf16="auto"), env=ACCELERATE_ZERO3)
    assert result.returncode == 0, failure(result)
    for task in TASKS:
        checkpoint = tmp_path / "launched" / "ilora" / "tasks" / task / "checkpoint-8"
        assert len(list(checkpoint.glob("global_step*/zero_pp_rank_*_model_states.pt"))) == 2
        assert_task_equals_ddp_and_loads(tmp_path / "launched", ddp_run, tiny_model_dir, task)
    manifest = json.loads((tmp_path / "launched" / "ilora" / "tasks" / TASKS[1] / "ilora_task.json").read_text())
    assert manifest["hardware"]["precision"] == "fp32"


def test_a_checkpoint_resumes_only_under_the_sharding_that_wrote_it(tmp_path):
    """ZeRO-3 writes its adapters whole into one file, FSDP2 and ZeRO-2 as dcp slices: one line for the
    other kind, not a KeyError from deep inside a loader."""
    model = peft_model()  # whole parameters: what FSDP2's and ZeRO-2's dcp slices are read into
    folder = tmp_path / "checkpoint-2" / "ilora_adapters_sharded"
    folder.mkdir(parents=True)
    (folder / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(ILoRAError, match="checkpoint-2: written by a run under ZeRO-3; resume it the way it ran"):
        sharding.load_adapters(adapter_parameters(model), folder)
