import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_model


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is; elsewhere they are skipped, visibly (-ra lists the reason)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def ddp_run(tiny_model_dir, tmp_path_factory) -> Path:
    """test_fsdp's two-task run under DDP (2 processes), which its FSDP2 run and test_deepspeed's ZeRO-2
    run must equal: run once for both."""
    from helpers import failure
    from test_fsdp import config, ilora_run

    root = tmp_path_factory.mktemp("ddp")
    result = ilora_run(config(root, tiny_model_dir, "ddp"))
    assert result.returncode == 0, failure(result)
    return root / "ddp"


@pytest.fixture(scope="session")
def ddp_method_run(tiny_model_dir, tmp_path_factory):
    """A method's two-task DDP run (test_fsdp's settings), run once per method for the FSDP2 and the
    DeepSpeed comparisons: returns its task folders."""
    from helpers import failure
    from test_fsdp import METHOD_SETTINGS, config, ilora_run

    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            root = tmp_path_factory.mktemp(f"ddp-{method}")
            result = ilora_run(config(root, tiny_model_dir, "ddp", method=method, **METHOD_SETTINGS))
            assert result.returncode == 0, failure(result)
            runs[method] = root / "ddp" / method / "tasks"
        return runs[method]

    return run
