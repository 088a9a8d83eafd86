"""The two LoRA adapters on one PEFT model, found once through an explicit interface.

`AdapterPair` collects, layer by layer, the plastic tensors and the stable tensors that mirror them
(matched by module and slot, never by parameter-name strings), checks the set is complete against
PEFT's own state dict, and offers the three things the method needs:

- `active(name)`: run a forward with one adapter without touching `requires_grad`. PEFT's
  `set_adapter` also flips `requires_grad` to the adapter it activates; calling it mid-step is how
  the public I-LoRA codes ended up never moving the stable adapter.
- `ema_(weight)`: `stable += weight * (plastic - stable)` as one vectorised in-place update.
- `plastic` / `stable` tensor lists (the optimizer sees only `plastic`).

Under FSDP2 the tensors are sharded DTensors, under DeepSpeed ZeRO-3 partitioned parameters: the
updates run on each rank's local parts (cut alike for both adapters), so pair again after the model is
sharded.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open

from ilora.errors import ILoRAError, did_you_mean
from ilora.files import read_json
from ilora.runtime import distributed, sharding

PLASTIC = "plastic"
STABLE = "stable"


def stable_config(plastic_config: LoraConfig) -> LoraConfig:
    """The stable adapter mirrors the plastic one but has no dropout: it is a teacher, and dropout
    noise in the target would make the consistency loss non-zero even when both adapters agree."""
    config = copy.deepcopy(plastic_config)
    config.lora_dropout = 0.0
    config.inference_mode = False
    return config


def attach_adapters(model: torch.nn.Module, lora_config: LoraConfig, with_stable: bool) -> PeftModel:
    """Wrap a base model with a fresh plastic adapter and, if asked, a stable copy of it."""
    if lora_config.modules_to_save:
        raise ILoRAError("modules_to_save is not supported: the stable adapter must cover every trained tensor")
    check_target_modules(model, lora_config.target_modules)
    with _peft_wrapping():
        peft_model = get_peft_model(model, lora_config, adapter_name=PLASTIC)
    if with_stable:
        peft_model.add_adapter(STABLE, stable_config(lora_config))
        AdapterPair(peft_model).copy_plastic_to_stable()
    peft_model.set_adapter(PLASTIC)
    return peft_model


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """PEFT's `PeftModel.__init__` reads transformers' deprecated `is_gradient_checkpointing` (PEFT's
    call, not ilora's, on every wrap): that FutureWarning alone is silenced, for this call alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_target_modules(model: torch.nn.Module, targets) -> None:
    """Every module name in lora_target exists in the model (PEFT's own error is a traceback)."""
    if isinstance(targets, str):  # "all-linear" or a regular expression: PEFT matches those itself
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} - {""}
    for target in targets:
        if target not in names:
            raise ILoRAError(f"lora_target {target!r} names no module of this model{did_you_mean(target, names)}")


# ------------------------------------------------------------ reading an adapter file
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SAVED_PREFIX = "base_model.model."  # PEFT's saved names: this prefix, the module's path, then the LoRA part


def check_adapter_dir(directory: Path, lora: dict | None = None) -> None:
    """A saved adapter that will load: readable config, readable safetensors of finite values, and
    (given the manifest's LoRA settings) the same rank and targets."""
    config = read_json(directory / ADAPTER_CONFIG, "adapter config")
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise ILoRAError(f"{directory / ADAPTER_CONFIG}: damaged adapter config (no integer 'r')")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ILoRAError(f"{weights}: missing (adapter weights)")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ILoRAError(f"{weights}: damaged adapter weights ({' '.join(str(err).split())})") from None
    if not tensors:
        raise ILoRAError(f"{weights}: damaged adapter weights (no tensors)")
    bad = next((key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ILoRAError(f"{weights}: tensor {bad} holds NaN or inf; this adapter diverged and cannot be used")
    if lora is not None and config["r"] != lora["r"]:
        raise ILoRAError(f"{directory / ADAPTER_CONFIG}: rank r={config['r']} but the task manifest says r={lora['r']}")
    ranks = {min(t.shape) for key, t in tensors.items() if "lora_A" in key and t.dim() == 2}
    if ranks and ranks != {config["r"]}:
        raise ILoRAError(f"{weights}: LoRA rank {sorted(ranks)} does not match r={config['r']} in {ADAPTER_CONFIG}")


def expected_adapter_tensors(model: torch.nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors (saved name -> shape) a LoRA adapter with `config` holds on `model`: A and B of every
    module PEFT would adapt (and DoRA's magnitudes), nothing else."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    expected = {}
    for name, module in base.named_modules():
        if ".lora_" in f".{name}" or name.endswith("base_layer") or not check_target_module_exists(config, name):
            continue
        layer = getattr(module, "base_layer", module)
        rank = (
            config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
            if config.rank_pattern
            else config.r
        )
        prefix = f"{SAVED_PREFIX}{name}"
        if isinstance(layer, torch.nn.Embedding):
            expected[f"{prefix}.lora_embedding_A"] = (rank, layer.num_embeddings)
            expected[f"{prefix}.lora_embedding_B"] = (layer.embedding_dim, rank)
        elif hasattr(layer, "in_features") and hasattr(layer, "out_features"):
            expected[f"{prefix}.lora_A.weight"] = (rank, layer.in_features)
            expected[f"{prefix}.lora_B.weight"] = (layer.out_features, rank)
            if config.use_dora:
                expected[f"{prefix}.lora_magnitude_vector"] = (layer.out_features,)
    return expected


def check_adapter_fits(model: torch.nn.Module, directory: Path) -> None:
    """The adapter file at `directory` holds exactly the tensors its LoRA config implies on `model`:
    the same names, shapes, floating-point values, nothing missing and nothing more (a base tensor such
    as `lm_head.weight` in an adapter file would be loaded into the base). Every route that loads an
    adapter (chaining, evaluation, export, resume) loads it through here."""
    check_adapter_dir(directory)  # readable config and weights, finite values
    config = LoraConfig.from_pretrained(str(directory))
    if config.modules_to_save:
        raise ILoRAError(
            f"{directory}: modules_to_save {sorted(config.modules_to_save)} replaces base layers; "
            "ilora's adapters hold LoRA tensors only"
        )
    expected = expected_adapter_tensors(model, config)
    weights = Path(directory) / ADAPTER_WEIGHTS
    with safe_open(str(weights), framework="pt") as handle:
        found = {
            key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()) for key in handle.keys()
        }
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ILoRAError(
            f"{weights}: tensor {extra[0]} is not part of a LoRA adapter with this config on this model "
            f"({len(extra)} such tensor{'s' if len(extra) > 1 else ''}); it would be loaded into the base"
        )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ILoRAError(
            f"{weights}: tensor {missing[0]} is missing ({len(missing)} missing) for the targets in "
            "its adapter_config.json"
        )
    for key, (shape, dtype) in found.items():
        if shape != expected[key]:
            raise ILoRAError(
                f"{weights}: tensor {key} has shape {list(shape)} and does not fit this model, which needs "
                f"{list(expected[key])} (an adapter made for another base)"
            )
        if dtype not in ("F32", "BF16", "F16", "F64"):
            raise ILoRAError(f"{weights}: tensor {key} holds {dtype}, not floating-point weights")


def load_adapter(peft_model: PeftModel, name: str, directory: Path) -> None:
    """Load a saved adapter under `name`, frozen: only `plastic` is ever trained."""
    check_adapter_fits(peft_model, directory)
    peft_model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    peft_model.set_adapter(PLASTIC)  # PEFT's set_adapter: plastic trainable, every other adapter frozen


def load_first_adapter(base: torch.nn.Module, directory: Path, trainable: bool) -> PeftModel:
    """A PeftModel on `base` with the adapter at `directory` as `plastic`, checked first."""
    check_adapter_fits(base, directory)
    with _peft_wrapping():
        return PeftModel.from_pretrained(base, str(directory), adapter_name=PLASTIC, is_trainable=trainable)


def load_saved_adapters(base: torch.nn.Module, adapters: dict[str, Path]) -> PeftModel:
    """A base model with every adapter a task saved, by name, all frozen (plastic first: the PeftModel
    is built on it)."""
    model = load_first_adapter(base, adapters[PLASTIC], trainable=False)
    for name, path in adapters.items():
        if name != PLASTIC:
            load_adapter(model, name, path)
    return model


def add_stable_copy(peft_model: PeftModel) -> None:
    """Give a model that has only a plastic adapter its stable twin, equal to it."""
    peft_model.add_adapter(STABLE, stable_config(peft_model.peft_config[PLASTIC]))
    peft_model.set_adapter(PLASTIC)
    AdapterPair(peft_model).copy_plastic_to_stable()


def save_adapter(peft_model: PeftModel, name: str, directory: Path, state_dict: dict | None = None) -> None:
    """Save one adapter as a standard PEFT directory (loadable with `PeftModel.from_pretrained`);
    `state_dict`: the model's tensors, whole, when its own are sharded."""
    staging = directory.parent / f".{directory.name}.saving"
    peft_model.save_pretrained(str(staging), selected_adapters=[name], safe_serialization=True, state_dict=state_dict)
    # PEFT writes a non-default adapter into a sub-directory named after it.
    saved = staging / name if (staging / name).is_dir() else staging
    if directory.exists():
        raise ILoRAError(f"{directory} already exists")
    saved.rename(directory)
    shutil.rmtree(staging, ignore_errors=True)  # PEFT also leaves a model card there


class AdapterPair:
    """Plastic and stable LoRA tensors of one PEFT model, paired once."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model
        self.layers: list[LoraLayer] = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ILoRAError("the model has no LoRA layers: check lora_target against the model's module names")
        self.has_stable = STABLE in peft_model.peft_config
        self.plastic: list[torch.nn.Parameter] = []
        self.stable: list[torch.nn.Parameter] = []
        self.slots: list[str] = []  # each plastic tensor's LoRA slot: lora_A, lora_B, lora_embedding_A, ...
        for layer in self.layers:
            for slot in layer.adapter_layer_names:
                container = getattr(layer, slot, None)
                if container is None or PLASTIC not in container:
                    continue
                tensors = _tensors(container[PLASTIC])
                self.plastic.extend(tensors)
                self.slots.extend([slot] * len(tensors))
                if self.has_stable:
                    self.stable.extend(_tensors(container[STABLE]))
        self._check_complete()
        self.freeze_stable()
        self.sharded = sharding.is_sharded(peft_model)
        self.partitioned = sharding.is_partitioned(peft_model)  # ZeRO-3: local parts move, never cache them
        self._local = (sharding.local(self.plastic), sharding.local(self.stable))

    @property
    def _plastic_local(self) -> list[torch.Tensor]:
        return sharding.local(self.plastic) if self.partitioned else self._local[0]

    @property
    def _stable_local(self) -> list[torch.Tensor]:
        return sharding.local(self.stable) if self.partitioned else self._local[1]

    def _check_complete(self) -> None:
        # the names and whole shapes only (a sharded parameter's own data may be empty outside the forward)
        shapes = {name: torch.empty(sharding.shape(p), device="meta") for name, p in self.peft_model.named_parameters()}
        expected = len(get_peft_model_state_dict(self.peft_model, state_dict=shapes, adapter_name=PLASTIC))
        if len(self.plastic) != expected:
            raise RuntimeError(f"found {len(self.plastic)} plastic LoRA tensors, PEFT's state dict has {expected}")
        if self.has_stable:
            shapes = [sharding.shape(p) for p in self.plastic]
            if shapes != [sharding.shape(s) for s in self.stable]:
                raise ILoRAError("the stable adapter's tensors do not match the plastic adapter's shapes")

    def freeze_stable(self) -> None:
        """Plastic trains, stable never does, whatever PEFT's `set_adapter` last decided."""
        for tensor in self.plastic:
            tensor.requires_grad_(True)
        for tensor in self.stable:
            tensor.requires_grad_(False)

    @contextlib.contextmanager
    def active(self, names: str | list[str]) -> Iterator[None]:
        """Route forwards through adapter `names` (several are summed, as O-LoRA's); `requires_grad` is
        left exactly as it was."""
        names = [names] if isinstance(names, str) else list(names)
        previous = [layer.active_adapters for layer in self.layers]
        for layer in self.layers:
            layer._active_adapter = names
        try:
            yield
        finally:
            for layer, names in zip(self.layers, previous):
                layer._active_adapter = names

    @torch.no_grad()
    def stable_in_fp32(self) -> None:
        """Put a stable adapter cast to 16 bits back in fp32 (DeepSpeed's bf16 mode casts the whole module
        when its engine starts; the EMA's steps, a few percent of a small difference, would be lost to
        bf16 rounding). PEFT casts a LoRA's input to its weights' dtype and its output back, so the
        forward runs as before. The values keep the one rounding the cast made, as the plastic adapter's
        do in DeepSpeed's fp32 master copy. Not for ZeRO-3's partitions (refused in bf16)."""
        if self.partitioned:
            return
        for tensor in self.stable:
            if tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        self._local = (sharding.local(self.plastic), sharding.local(self.stable))

    @torch.no_grad()
    def ema_(self, weight: float | torch.Tensor) -> None:
        """stable <- stable + weight * (plastic - stable) = (1 - weight) * stable + weight * plastic.

        `weight` may be a 0-dim tensor (selective update decides on the device, without a host sync).
        A plastic adapter in bf16 (DeepSpeed's bf16 mode) is read in fp32, the stable one's dtype."""
        plastic, stable = self._plastic_local, self._stable_local
        if plastic and plastic[0].dtype != stable[0].dtype:
            plastic = [t.to(stable[0].dtype) for t in plastic]
        if isinstance(weight, torch.Tensor):
            delta = torch._foreach_sub(plastic, stable)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(stable, delta)
        else:
            torch._foreach_lerp_(stable, plastic, weight)
        if self.partitioned:
            sharding.release_gathered(self.stable)

    @torch.no_grad()
    def copy_plastic_to_stable(self) -> None:
        torch._foreach_copy_(self._stable_local, self._plastic_local)
        if self.partitioned:
            sharding.release_gathered(self.stable)

    @torch.no_grad()
    def finite_flags(self) -> list[torch.Tensor]:
        """One 0-dim bool per tensor (this rank's slice when sharded): is every weight finite?"""
        return [torch.isfinite(t).all() for t in self._plastic_local + self._stable_local]

    @torch.no_grad()
    def bounded_flags(self, limit: float) -> list[torch.Tensor]:
        """One 0-dim bool per non-empty tensor (this rank's slice): is every weight within +-limit?
        (NaN counts as within: `finite_flags` reports it.)"""
        return [~(t.abs().amax() > limit) for t in self._plastic_local + self._stable_local if t.numel()]

    @torch.no_grad()
    def checksum(self) -> float:
        """Sum and sum of squares of every plastic and stable weight: equal on ranks holding equal adapters.
        Sharded, the slices' sums add up over the ranks (a collective), so every rank reports the whole's."""
        total = torch.zeros((), dtype=torch.float64, device=self._plastic_local[0].device)
        for t in self._plastic_local + self._stable_local:
            total += t.double().sum() + t.double().pow(2).sum()
        if self.sharded:
            total = distributed.sum_(total)
        return float(total)


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every tensor of every LoRA adapter on `model`, by its state-dict name, found through PEFT's LoRA
    layers (module, slot, adapter), never by matching parameter names: what sharded checkpoints save."""
    found = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for slot in layer.adapter_layer_names:
            for adapter, part in (getattr(layer, slot, None) or {}).items():
                named = [("", part)] if isinstance(part, torch.nn.Parameter) else list(part.named_parameters())
                for param_name, param in named:
                    found[".".join(p for p in (module_name, slot, adapter, param_name) if p)] = param
    return found


@torch.no_grad()
def fold_into_base(model: PeftModel, changes: dict[str, torch.Tensor]) -> None:
    """Add `changes` ({module name in `model.named_modules()`: dense change of its weight}) to the base
    weights, for good (a merged export)."""
    modules = dict(model.named_modules())
    for name, change in changes.items():
        weight = getattr(modules[name], "base_layer", modules[name]).weight
        weight.add_(change.to(weight.device, weight.dtype))


@contextlib.contextmanager
def weights_added(model: PeftModel, changes: dict[str, torch.Tensor]) -> Iterator[None]:
    """Forwards through the base weights plus `changes` ({module name in `model.named_modules()`: dense
    change of its weight}), every adapter off; the base weights are restored exactly on exit."""
    modules = dict(model.named_modules())
    saved = {name: getattr(modules[name], "base_layer", modules[name]).weight.detach().clone() for name in changes}
    fold_into_base(model, changes)
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                getattr(modules[name], "base_layer", modules[name]).weight.copy_(original)


def _tensors(module_or_param: torch.nn.Module | torch.nn.Parameter) -> list[torch.nn.Parameter]:
    if isinstance(module_or_param, torch.nn.Parameter):
        return [module_or_param]
    return list(module_or_param.parameters())
