"""One device resolver and one dtype table for every tool (train, sample, export, import, serve).

Both raise ValueError with a sentence naming the flag, so every tool reports a bad --device or --dtype
as a one-line error instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, allowed: tuple[str, ...] = ("float32", "bfloat16")) -> torch.dtype:
    """A --dtype name (aliases fp32/bf16/...) -> torch dtype, among the canonical names in `allowed`."""
    dtype = DTYPES.get(name)
    if dtype is None or next(k for k, v in DTYPES.items() if v == dtype) not in allowed:
        raise ValueError(f"--dtype must be one of {', '.join(allowed)}, got {name!r}")
    return dtype


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """--device auto|cpu|cuda|cuda:N|mps -> a device that exists here, or ValueError saying what is there.

    auto: the GPU (this process's local_rank under torchrun) when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu or auto")
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else (local_rank or 0)
        if index >= count:
            raise ValueError(f"--device {name}: GPU {index} does not exist (this machine has {count})")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: StoryLlama runs on cpu, cuda or mps")
    return device
