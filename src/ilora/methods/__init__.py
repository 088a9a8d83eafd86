"""Continual-learning methods, one module each, found by name.

A new method is one module (a `Method` subclass, see `base.py` for the interface it keeps) and one
line in `REGISTRY`. Modules load on first use: `import ilora.methods` imports nothing heavy.
"""

from __future__ import annotations

import importlib

from ilora.errors import ILoRAError, did_you_mean

REGISTRY = {
    "seq_lora": "seq_lora:SeqLoRA",
    "er": "er:ER",
    "joint": "joint:Joint",
    "ilora": "ilora:ILoRA",
    "ewc": "ewc:EWC",
    "lwf": "lwf:LwF",
    "derpp": "derpp:DERpp",
    "olora": "olora:OLoRA",
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str):
    """The method class registered as `name`; an unknown name is a one-line error."""
    if name not in REGISTRY:
        raise ILoRAError(f"method {name!r} is not one of {names()}{did_you_mean(str(name), REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def argument_classes() -> dict[str, type]:
    """Each method's own hyperparameter dataclass, by method name (for the parser and --help)."""
    return {name: get(name).Arguments for name in REGISTRY if get(name).Arguments is not None}
