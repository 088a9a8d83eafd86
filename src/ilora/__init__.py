"""ilora: continual fine-tuning of causal LMs with I-LoRA (plastic + stable LoRA, replay, consistency)
and the field's baselines as plug-in methods (`ilora.methods`).

The folders are the layers, each importing only from those below it (tests/test_layers.py checks):
errors < files < data, runtime < config, core < methods < store < evaluation < trainer < pipeline < cli.
Exports load lazily: `import ilora.evaluation.metrics` (a pure module) must not pull in torch,
transformers or peft.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.3.0"


def _not_kernel_noise(record: logging.LogRecord) -> bool:
    """peft and transformers import bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 it
    then tries to fetch a kernel from the hub and logs its failure, although nothing may be quantized.
    A quantized base still works without that kernel (bitsandbytes falls back to its own)."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def _not_accelerator_noise(record: logging.LogRecord) -> bool:
    """transformers and accelerate ask DeepSpeed, whenever it is installed, which accelerator it runs on;
    on a machine without a GPU it says so on every command, although nothing may run under DeepSpeed."""
    return not str(record.msg).startswith("Setting accelerator to CPU")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_kernel_noise)
logging.getLogger("DeepSpeed").addFilter(_not_accelerator_noise)

_EXPORTS = {
    "ContinualArguments": "config.arguments",
    "DataArguments": "config.arguments",
    "ModelArguments": "config.arguments",
    "ILoRAArguments": "methods.ilora",
    "ILoRAError": "errors",
    "ILoRA": "methods.ilora",
    "ILoRATrainer": "trainer",
    "ReplayBuffer": "core.buffer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
