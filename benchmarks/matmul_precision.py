"""fp32 against bf16 matrix products on this CPU: whether bf16 is native here or emulated.

    python benchmarks/matmul_precision.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/matmul_precision.py   # as on an AVX2-only CPU

Prints the CPU, torch's capability and bf16 probes, then GFLOPS of a 1024x1024 product per dtype, and
ilora's automatic choice (`bf16: auto`) for this CPU.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ilora.runtime import precision


def gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    torch.manual_seed(0)
    hardware = precision.detect("cpu")
    env = {
        k: os.environ[k]
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    }
    print(f"{hardware.label()}, threads {torch.get_num_threads()}, native bf16 {hardware.native_bf16}, env {env}")
    result = {"fp32_gflops": gflops(torch.float32, repeats=20), "bf16_gflops": gflops(torch.bfloat16, repeats=5)}
    bf16, fp16 = precision.choose(precision.AUTO, precision.AUTO, hardware)
    result["auto_choice"] = precision.name(bf16, fp16)
    print(
        f"fp32 {result['fp32_gflops']:.1f} GFLOPS, bf16 {result['bf16_gflops']:.1f} GFLOPS; bf16: auto chooses "
        f"{result['auto_choice']}"
    )
    print(
        json.dumps(
            {
                **{k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()},
                "cpu": hardware.label(),
                "env": env,
            }
        )
    )


if __name__ == "__main__":
    main()
