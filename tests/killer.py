"""Runs the ilora CLI, killing itself with SIGKILL at a chosen point (`python killer.py MODE N ARGS...`,
or under torchrun, where every rank runs it):
  step N        right after optimizer step N (checkpoints are saved after that hook)
  checkpoint N  while checkpoint-N is being written (adapters written, buffer and marker not yet)
  task N        right after task N of a sequence is finished and evaluated (rank 0)
  none 0        never
"""

import os
import signal
import sys

from transformers import TrainerCallback

import ilora.pipeline.sequence as sequence_module
import ilora.trainer as trainer_module
from ilora.cli import main

mode, at = sys.argv[1], int(sys.argv[2])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == at:
            die()


original_init = trainer_module.ILoRATrainer.__init__


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if mode == "step":
        self.add_callback(KillAtStep())


trainer_module.ILoRATrainer.__init__ = init

original_save = trainer_module.ReplayBuffer.save


def save(self, directory):
    if mode == "checkpoint" and f"checkpoint-{at}" in str(directory):
        die()
    original_save(self, directory)


trainer_module.ReplayBuffer.save = save

original_write_json = sequence_module.write_json


def write_json(path, data, *args, **kwargs):
    """A task's eval.json written last: then the task is finished and evaluated."""
    original_write_json(path, data, *args, **kwargs)
    if mode == "task" and path.name == "eval.json" and path.parent.name.startswith(f"{at}-"):
        die()


sequence_module.write_json = write_json

sys.exit(main(sys.argv[3:]))
