"""ilora: continual fine-tuning of causal LMs with I-LoRA (plastic + stable LoRA, replay, consistency)."""

from .buffer import ReplayBuffer
from .config import DataArguments, ILoRAArguments, ModelArguments
from .errors import ILoRAError
from .method import ILoRA
from .trainer import ILoRATrainer

__version__ = "0.1.0"
__all__ = [
    "DataArguments",
    "ILoRA",
    "ILoRAArguments",
    "ILoRAError",
    "ILoRATrainer",
    "ModelArguments",
    "ReplayBuffer",
]
