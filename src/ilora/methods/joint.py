"""Joint (multi-task) training: one LoRA on every task's data at once, in one stage.

Not continual learning: the upper bound. `ilora run` gives it the sequence's optimizer steps, each
on as many rows as a replay step sees (see `workflow.joint_training_arguments`).
"""

from __future__ import annotations

from ilora.methods.seq_lora import SeqLoRA


class Joint(SeqLoRA):
    name = "joint"
    trains_jointly = True
