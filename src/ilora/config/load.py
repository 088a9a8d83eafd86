"""A config file's keys as the parser takes them: YAML, or JSON for a `.json` file (LLaMA-Factory reads
both), bounded in size, a key given twice refused, relative paths read from the file's directory, and
`key=value` overrides from the command line. Pure: no torch, no transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ilora.errors import ILoRAError
from ilora.files import check_regular_file

BUNDLED_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"  # the embedded default (SmolLM2, the demo)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# A config is a page of settings. The bounds stop a YAML alias bomb (a few lines that expand to
# billions of nodes) before it is expanded, and a huge file before it is parsed.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000

# Keys whose value is a path. In a config file a relative path is read from the config file's
# directory (the rule for every path in a config, tasks' files included); on the command line, from
# the working directory, as with any command.
PATH_KEYS = (
    "model_name_or_path",
    "model",
    "dataset",
    "dataset_dir",
    "output_dir",
    "previous_task_model",
    "ema_adapter_path",
    "logging_dir",
    "resume_from_checkpoint",
    "general",
    "data_dir",
    "deepspeed",
    "start_from",
    "start_from_data",
    "start_from_test",
)
NOT_PATHS = {"smollm2", "true", "false", "last", "True", "False"}  # names and flags those keys also accept
# Keys that LLaMA-Factory writes as comma-separated strings and YAML users write as lists.
COMMA_LISTS = ("lora_target",)


def is_config_path(argument: str) -> bool:
    return argument.lower().endswith(CONFIG_SUFFIXES)


def load_config(path: Path) -> dict:
    """A config file's top-level mapping: YAML, or JSON for a .json file; a key given twice is refused
    (both parsers would silently keep the last)."""
    check_regular_file(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ILoRAError(f"{path}: {size} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes")
    data = _load_json_config(path) if path.suffix.lower() == ".json" else _load_yaml_config(path)
    if not isinstance(data, dict):
        raise ILoRAError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def config_mapping(mapping: dict, path: Path) -> dict:
    """A config file's keys as the parser takes them: paths read from the file's directory, lists
    joined where LLaMA-Factory writes comma-separated strings."""
    result = joined_lists(mapping, str(path))
    for key in PATH_KEYS:
        if key == "dataset" and result.get("dataset_dir"):
            continue  # names of datasets in dataset_dir's dataset_info.json, not paths
        if isinstance(result.get(key), str) and result[key] not in NOT_PATHS:
            result[key] = resolve_path(result[key], path)
    return result


def joined_lists(mapping: dict, where: str) -> dict:
    """`lora_target: [q_proj, v_proj]` as LLaMA-Factory's `q_proj,v_proj`."""
    result = dict(mapping)
    for key in COMMA_LISTS:
        value = result.get(key)
        if isinstance(value, list):
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ILoRAError(f"{where}: {key} must be a list of module names, got {value!r}")
            result[key] = ",".join(value)
    return result


def resolve_path(value: Any, config: Path) -> Any:
    """A path from a config file, read from that file's directory (`~` expands); other values as given."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else config.parent / path)


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """`key=value` arguments after a config file, as `llamafactory-cli train config.yaml key=value` takes
    them: each value read as YAML (`seed=1` is a number, `lora_target=[q_proj,v_proj]` a list); a key
    given twice is refused. Paths in them are read from the working directory, like flags."""
    overrides: dict[str, Any] = {}
    for argument in arguments:
        key, sep, text = argument.partition("=")
        if not sep or not key or key.startswith("-") or any(c.isspace() for c in key):
            raise ILoRAError(f"{argument!r}: after the config, give overrides as key=value")
        if "." in key:
            raise ILoRAError(f"{argument!r}: an override sets a top-level key of the config (key=value)")
        if key in overrides:
            raise ILoRAError(f"{key} is overridden twice ({key}={overrides[key]!r} and {argument!r})")
        try:
            overrides[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ILoRAError(f"{argument!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    return joined_lists(overrides, "the command line")


def _load_json_config(path: Path) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise ILoRAError(f"{path}: key {repeated!r} appears twice in one object (JSON keeps only the last)")
        return dict(pairs)

    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: not valid JSON ({err}); a .json config is read as JSON") from None
    except RecursionError:
        raise ILoRAError(f"{path}: nested too deeply") from None


def _load_yaml_config(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is fine
        nodes = _expanded_nodes(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_CONFIG_NODES:
            raise ILoRAError(
                f"{path}: expands to {nodes} values (YAML aliases); a config may hold at most {MAX_CONFIG_NODES}"
            )
        return yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ILoRAError(f"{path}: nested too deeply") from None


def _refuse_repeated_keys(node: yaml.MappingNode) -> None:
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # `<<` merges: it may repeat
            if key.value in seen:
                raise yaml.YAMLError(
                    f"line {key.start_mark.line + 1}: key {key.value!r} appears twice in one "
                    "mapping (YAML keeps only the last)"
                )
            seen.add(key.value)


def _expanded_nodes(root: yaml.Node | None) -> int:
    """How many values the document holds once every alias is expanded, counted without expanding."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise yaml.YAMLError("a recursive alias")
        visiting.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _refuse_repeated_keys(node)
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        sizes[key] = 1 + sum(size(child) for child in children)
        visiting.discard(key)
        return sizes[key]

    return 0 if root is None else size(root)


def to_argv(mapping: dict) -> list[str]:
    """A mapping of keys as the flags that set them: YAML and flags share one parser."""
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if key == "fsdp" and isinstance(value, bool):  # the Trainer's flag takes no value: a bare `--fsdp` is on
            argv += ["--fsdp"] if value else []
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv
