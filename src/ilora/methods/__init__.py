"""Layer 4: continual-learning methods, one module each, found by name.

A new method is one module (a `Method` subclass with its options dataclass beside it: see `base.py`
for the interface, and docs/architecture.md for how to add one) and one line in `REGISTRY`. A method
kept in another package is registered at run time: `register("mine", "my_package.my_module:Mine")`.
Modules load on first use: `import ilora.methods` imports nothing heavy.
"""

from __future__ import annotations

import importlib

from ilora.errors import ILoRAError, did_you_mean

REGISTRY = {
    "seq_lora": "ilora.methods.seq_lora:SeqLoRA",
    "er": "ilora.methods.er:ER",
    "joint": "ilora.methods.joint:Joint",
    "ilora": "ilora.methods.ilora:ILoRA",
    "ewc": "ilora.methods.ewc:EWC",
    "lwf": "ilora.methods.lwf:LwF",
    "derpp": "ilora.methods.derpp:DERpp",
    "olora": "ilora.methods.olora:OLoRA",
    "nlora": "ilora.methods.nlora:NLoRA",
    "inflora": "ilora.methods.inflora:InfLoRA",
    "magmax": "ilora.methods.magmax:MagMax",
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str):
    """The method class registered as `name`; an unknown name is a one-line error."""
    if name not in REGISTRY:
        raise ILoRAError(f"method {name!r} is not one of {names()}{did_you_mean(str(name), REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


BUILT_IN = frozenset(REGISTRY)


def register(name: str, target: str) -> None:
    """Register a method kept outside ilora: `target` is "module:Class" (an importable module). The class
    must be a `Method` named `name`; options of its own are a dataclass whose field names start with `name_`."""
    if name in REGISTRY:
        raise ILoRAError(f"method {name!r} is registered already")
    module, _, cls = target.partition(":")
    if not module or not cls:
        raise ILoRAError(f"method {name!r}: give the class as 'module:Class', got {target!r}")
    REGISTRY[name] = target


def unregister(name: str) -> None:
    """Remove a method registered with `register` (ilora's own stay)."""
    if name not in REGISTRY or name in BUILT_IN:
        raise ILoRAError(f"method {name!r} was not registered with register()")
    del REGISTRY[name]


def argument_classes() -> dict[str, type | None]:
    """Every method's own options dataclass (None for a method without options), by method name: the
    parser makes their fields flags and config keys, and `--help` lists them."""
    return {name: get(name).Arguments for name in REGISTRY}
