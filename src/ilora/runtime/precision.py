"""Which floating-point precision a run uses, chosen by the hardware it runs on.

`bf16` and `fp16` take `auto` (the default), `true` or `false`. `auto` means: bf16 where the device
computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), fp16 on a CUDA GPU without
bf16, fp32 otherwise. An explicit `true`/`false` wins. bf16 forced on a CPU that only emulates it is
allowed, with a warning: measured on an AVX2-only AMD EPYC, a bf16 matrix product ran at 0.9 GFLOPS
against 47-79 in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ilora.errors import ILoRAError

log = logging.getLogger(__name__)
AUTO = "auto"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class Hardware:
    """What a figure or a manifest says it ran on."""

    device: str  # "cuda" or "cpu"
    name: str  # the GPU's or the CPU's model name
    capability: str  # CPU: torch's vector capability (AVX2, AVX512, ...); CUDA: sm_XY
    native_bf16: bool
    native_fp16: bool

    def record(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"{self.name} ({self.device}, {self.capability})"


def detect(device: str) -> Hardware:
    """The hardware behind torch device type `device` ("cuda" or anything else: the CPU)."""
    if device == "cuda":
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return Hardware(
            "cuda",
            torch.cuda.get_device_name(index),
            f"sm_{major}{minor}",
            native_bf16=torch.cuda.is_bf16_supported(),
            native_fp16=True,
        )
    capability = torch.backends.cpu.get_cpu_capability()
    # AVX512-BF16 counts only where torch dispatches AVX512 kernels: restricted to AVX2 (ATEN_CPU_CAPABILITY,
    # ONEDNN_MAX_CPU_ISA), this CPU ran bf16 products at 0.9 GFLOPS against 430 unrestricted
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported() and capability.startswith("AVX512")
    native = bool(avx512_bf16 or torch.cpu._is_amx_tile_supported())
    return Hardware("cpu", cpu_model(), capability, native_bf16=native, native_fp16=False)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_flag(name: str, value: str | bool) -> str | bool:
    """`auto`, or a boolean from the usual spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ILoRAError(f"{name}={value!r} must be auto, true or false")


def choose(bf16: str | bool, fp16: str | bool, hardware: Hardware) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer. Explicit values win; `auto` follows the hardware."""
    if bf16 is True and fp16 is True:
        raise ILoRAError("bf16 and fp16 are both true: choose one (or auto)")
    if bf16 is not AUTO and fp16 is not AUTO:
        return bf16, fp16
    if bf16 is True:
        return True, False
    if fp16 is True:
        return False, True
    if bf16 is AUTO and hardware.native_bf16:
        return True, False
    if fp16 is AUTO and hardware.device == "cuda" and hardware.native_fp16:
        return False, True
    return False, False


def name(bf16: bool, fp16: bool) -> str:
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def run_record(args) -> dict:
    """Precision and hardware of a run with these TrainingArguments, for manifests and metrics."""
    return {"precision": name(args.bf16, args.fp16), **detect(args.device.type).record()}


def autocast_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    """The dtype evaluation autocasts to: the same choice as training."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


@contextlib.contextmanager
def inference(model: torch.nn.Module, autocast: torch.dtype | None) -> Iterator[None]:
    """Eval mode, autocast to `autocast` (None: none), and the model's mode restored after."""
    amp = torch.autocast(model.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with amp:
            yield
    finally:
        model.train(was_training)


_warned: set[str] = set()


def warn_if_emulated(bf16: bool, hardware: Hardware) -> None:
    """Once per process: a run of many tasks says it once."""
    if bf16 and hardware.device == "cpu" and not hardware.native_bf16 and hardware.label() not in _warned:
        _warned.add(hardware.label())
        log.warning(
            "bf16 on %s: this CPU has no AVX512-BF16 or AMX, so bf16 matrix products are emulated and run "
            "tens of times slower than fp32; use bf16: auto (fp32 here) unless you need bf16's numbers",
            hardware.label(),
        )
