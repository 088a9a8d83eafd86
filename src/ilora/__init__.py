"""ilora: continual fine-tuning of causal LMs with I-LoRA (plastic + stable LoRA, replay, consistency)
and the field's baselines as plug-in methods (`ilora.methods`).

Exports load lazily: `import ilora.metrics` (a pure module) must not pull in torch, transformers or peft.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DataArguments": "config",
    "ILoRAArguments": "config",
    "ModelArguments": "config",
    "ILoRAError": "errors",
    "ILoRA": "methods.ilora",
    "ILoRATrainer": "trainer",
    "ReplayBuffer": "buffer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
