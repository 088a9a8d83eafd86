"""Where ilora writes, checked before anything loads: nothing of the user's is ever replaced.

ilora replaces a path only when it holds ilora's own output of the same kind (an adapter directory
where an adapter goes, a replay buffer where a buffer goes), and only when the user allowed it
(`--overwrite_output_dir`) or the output is the unfinished leftover of an interrupted ilora write.
Outputs may not collide with each other or with what the task reads (the previous task, the
stable adapter it starts from, a checkpoint). Pure: no torch, no transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ilora.errors import ILoRAError

NAME_MAX = 255  # bytes in one path component on the common file systems (ext4, xfs, apfs, ntfs)

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}
BUFFER_FILES = {"buffer.safetensors", "buffer.json"}
_RANK_DIR = re.compile(r"^rank-\d+$")


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory and nothing else (what ilora writes for plastic and stable)."""
    names = {p.name for p in path.iterdir()}
    return "adapter_config.json" in names and names <= ADAPTER_FILES and not any(p.is_dir() for p in path.iterdir())


def is_buffer_dir(path: Path) -> bool:
    """A replay buffer: buffer files, or one `rank-<r>/` folder of them per process."""
    entries = list(path.iterdir())
    if not entries:
        return False
    for entry in entries:
        if entry.is_dir():
            if not _RANK_DIR.match(entry.name) or not is_buffer_dir(entry):
                return False
        elif entry.name not in BUFFER_FILES:
            return False
    return True


KINDS = {"adapter": is_adapter_dir, "buffer": is_buffer_dir}

# The Trainer writes `checkpoint-<step>` folders into output_dir and deletes the oldest (save_total_limit):
# every folder of that name must be ilora's. ilora claims one before the Trainer writes into it.
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_CLAIM = ".ilora-checkpoint"  # created first: the Trainer's files follow
CHECKPOINT_MARKER = "ilora_checkpoint.json"  # written last: the checkpoint is complete


def is_ilora_checkpoint(path: Path) -> bool:
    """A checkpoint folder ilora claimed or completed, or an empty one (a write killed at its start)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / CHECKPOINT_CLAIM).is_file() or (path / CHECKPOINT_MARKER).is_file() or not any(path.iterdir())


def check_trainer_outputs(output_dir: Path) -> None:
    """Nothing named like a Trainer checkpoint in output_dir is someone else's."""
    if not output_dir.is_dir():
        return
    for entry in sorted(output_dir.iterdir()):
        if entry.name.startswith(CHECKPOINT_PREFIX) and not is_ilora_checkpoint(entry):
            raise ILoRAError(
                f"{entry} was not written by ilora, and the Trainer writes and rotates "
                f"{CHECKPOINT_PREFIX}* folders in output_dir; ilora never touches it: choose another output_dir"
            )


def check_replaceable(path: Path, kind: str, allowed: bool, what: str) -> None:
    """`path` may be written: it does not exist, or it holds ilora's `kind` and replacing it is allowed."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or not KINDS[kind](path):
        raise ILoRAError(
            f"{what} {path} already exists and is not an ilora {kind} directory; "
            "ilora never replaces it: choose another path"
        )
    if not allowed:
        raise ILoRAError(f"{what} {path} already holds an adapter or buffer; pass --overwrite_output_dir to replace it")


def check_directory_target(path: Path, what: str) -> None:
    """A directory ilora will create or write into: not a file, names the file system can hold."""
    for part in path.parts:
        if len(part.encode()) > NAME_MAX:
            raise ILoRAError(f"{what}: the name {part[:40]!r}... is {len(part.encode())} bytes; at most {NAME_MAX}")
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ILoRAError(f"{what} {path}: {parent} is a file, not a directory")
        if parent.exists():
            break


def overlaps(a: Path, b: Path) -> bool:
    """The same path, or one inside the other."""
    a, b = _absolute(a), _absolute(b)
    return a == b or a in b.parents or b in a.parents


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


@dataclass
class TaskOutputs:
    """The paths one task writes and the paths it reads; `check()` refuses every unsafe combination."""

    output_dir: Path
    adapters: dict[str, Path]  # where each adapter the task saves is written, by adapter name
    reads: dict[str, Path]  # what the task starts from, e.g. {"previous_task_model": ...}
    overwrite: bool

    def writes(self) -> dict[str, tuple[Path, str]]:
        """What -> (path, kind) of every directory the task replaces."""
        paths = {f"{name} adapter": (path, "adapter") for name, path in self.adapters.items()}
        paths["replay buffer"] = (self.output_dir / "buffer", "buffer")
        return paths

    def check(self, finished: bool) -> None:
        """`finished`: output_dir already holds a finished task (its manifest)."""
        check_directory_target(self.output_dir, "output_dir")
        if finished and not self.overwrite:
            raise ILoRAError(
                f"output_dir {self.output_dir} already holds a finished task; pass --overwrite_output_dir to replace it"
            )
        check_trainer_outputs(self.output_dir)
        writes = self.writes()
        for what, (path, kind) in writes.items():
            check_directory_target(path, what)
            check_replaceable(path, kind, self.overwrite, what)
            outside = _absolute(self.output_dir) not in _absolute(path).parents
            if outside and overlaps(path, self.output_dir):  # output_dir itself, or a folder holding it
                raise ILoRAError(f"the {what} at {path} would replace output_dir {self.output_dir}")
        items = list(writes.items())
        for i, (what, (path, _)) in enumerate(items):
            for other, (other_path, _) in items[i + 1 :]:
                if overlaps(path, other_path):
                    raise ILoRAError(f"the {what} and the {other} would both be written at {path}")
        for what, source in self.reads.items():
            if _absolute(source) == _absolute(self.output_dir):
                raise ILoRAError(f"{what} {source} is output_dir itself: a task cannot overwrite what it starts from")
            for target, (path, _) in writes.items():
                if overlaps(source, path):
                    raise ILoRAError(f"the {target} at {path} would overwrite {what} {source}, which this task reads")
