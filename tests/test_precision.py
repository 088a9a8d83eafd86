"""Precision chosen by the hardware: the choice on every kind of device (capabilities mocked), the
parsing of `auto`, the warning for emulated bf16, and what a run records."""

import json
import logging

import pytest
import torch
from tiny import sentiment_rows, write_jsonl

from ilora.cli import main
from ilora.config.parse import parse_train_args
from ilora.errors import ILoRAError
from ilora.runtime import precision
from ilora.runtime.precision import AUTO, Hardware

AVX2_CPU = Hardware("cpu", "AMD EPYC", "AVX2", native_bf16=False, native_fp16=False)
AMX_CPU = Hardware("cpu", "Intel Xeon", "AVX512", native_bf16=True, native_fp16=False)
H100 = Hardware("cuda", "NVIDIA H100", "sm_90", native_bf16=True, native_fp16=True)
T4 = Hardware("cuda", "Tesla T4", "sm_75", native_bf16=False, native_fp16=True)

# (hardware, requested bf16, requested fp16) -> (bf16, fp16)
CHOICES = [
    (AVX2_CPU, AUTO, AUTO, (False, False)),
    (AMX_CPU, AUTO, AUTO, (True, False)),
    (H100, AUTO, AUTO, (True, False)),
    (T4, AUTO, AUTO, (False, True)),
    (AVX2_CPU, True, AUTO, (True, False)),  # forced: allowed, with a warning
    (AMX_CPU, False, AUTO, (False, False)),
    (H100, AUTO, True, (False, True)),  # fp16 asked for explicitly wins over bf16 auto
    (H100, False, False, (False, False)),
    (T4, AUTO, False, (False, False)),
    (AVX2_CPU, AUTO, True, (False, True)),
]


@pytest.mark.parametrize("hardware, bf16, fp16, expected", CHOICES)
def test_the_choice_on_each_device(hardware, bf16, fp16, expected):
    assert precision.choose(bf16, fp16, hardware) == expected


def test_both_forced_is_refused():
    with pytest.raises(ILoRAError, match="both true"):
        precision.choose(True, True, H100)


@pytest.mark.parametrize(
    "capability, avx512_bf16, amx, native",
    [
        ("AVX2", False, False, False),
        ("AVX512", True, False, True),
        ("AVX512", False, True, True),
        ("AVX2", True, False, False),  # AVX512-BF16 in the CPU, but torch restricted to AVX2 kernels
        ("DEFAULT", False, False, False),
    ],
)
def test_cpu_detection_reads_the_capability_queries(monkeypatch, capability, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    hardware = precision.detect("cpu")
    assert hardware.native_bf16 is native and hardware.device == "cpu" and hardware.capability
    assert precision.choose(AUTO, AUTO, hardware) == (native, False)


@pytest.mark.parametrize(
    "value, parsed", [("auto", AUTO), ("AUTO", AUTO), ("true", True), ("False", False), ("1", True)]
)
def test_flag_spellings(value, parsed):
    assert precision.parse_flag("bf16", value) == parsed


def test_an_unknown_flag_value_is_one_line():
    with pytest.raises(ILoRAError, match="bf16='maybe' must be auto, true or false"):
        parse_train_args(["--output_dir", "x", "--use_cpu", "true", "--bf16", "maybe"])


@pytest.mark.parametrize(
    "argv, expected",
    [([], None), (["--bf16", "false"], False), (["--bf16=auto"], None), (["--bf16"], True), (["--bf16", "true"], True)],
)
def test_auto_is_the_default_and_explicit_values_win(argv, expected, monkeypatch):
    args = parse_train_args(["--output_dir", "x", "--use_cpu", "true", *argv]).training
    native = precision.detect("cpu").native_bf16
    assert args.bf16 is (native if expected is None else expected) and args.fp16 is False


def test_forced_bf16_on_an_emulating_cpu_warns_once(caplog):
    precision._warned.clear()
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        precision.warn_if_emulated(True, AVX2_CPU)
    precision.warn_if_emulated(True, AMX_CPU)
    precision.warn_if_emulated(False, AVX2_CPU)
    warnings = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warnings) == 1 and "AMD EPYC (cpu, AVX2)" in warnings[0]


def test_a_run_with_auto_records_the_precision_and_hardware_it_used(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path / "t"),
                "--lora_target",
                "q_proj,v_proj",
                "--max_steps",
                "1",
                "--report_to",
                "none",
                "--use_cpu",
                "true",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "t" / "ilora_task.json").read_text())
    here = precision.detect("cpu")
    assert manifest["hardware"]["precision"] == ("bf16" if here.native_bf16 else "fp32")
    assert manifest["hardware"]["name"] == here.name and manifest["hardware"]["capability"] == here.capability


@pytest.mark.parametrize("launch", ["config", "zero3 config", "accelerate"])
def test_under_deepspeed_auto_is_fp32_and_refused_half_precision_is_one_line(launch, monkeypatch):
    """DeepSpeed's half modes cast the stable adapter to 16 bits: bf16 only where ilora puts it back in fp32
    (ZeRO-0/1/2 through the deepspeed setting: tests/test_deepspeed.py trains it), fp16 never."""
    from types import SimpleNamespace

    from ilora.config.parse import _with_precision

    monkeypatch.setattr(precision, "detect", lambda device: H100)  # auto would pick bf16 here
    if launch == "accelerate":  # `accelerate launch --use_deepspeed`: no deepspeed setting, the environment says so
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    zero3 = SimpleNamespace(is_zero3=lambda: launch == "zero3 config")
    args = SimpleNamespace(
        use_cpu=False,
        deepspeed=None if launch == "accelerate" else "ds.json",
        bf16=False,
        fp16=False,
        hf_deepspeed_config=None if launch == "accelerate" else zero3,
    )
    assert _with_precision(args, {}) is args  # auto: fp32, nothing to change
    with pytest.raises(ILoRAError, match="--fp16 true with --deepspeed: DeepSpeed's fp16 mode casts"):
        _with_precision(args, {"fp16": "true"})
    refusal = {
        "zero3 config": "--bf16 true with DeepSpeed ZeRO-3: DeepSpeed's bf16 mode casts",
        "accelerate": "--bf16 true with accelerate launch --use_deepspeed: ilora trains",
    }
    if launch in refusal:
        with pytest.raises(ILoRAError, match=refusal[launch]):
            _with_precision(args, {"bf16": "true"})
