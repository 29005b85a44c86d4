"""Where a model runs and in which precision: one resolver for the serving engine and the evaluation step.

``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``dtype`` is ``auto``, ``float32``, ``bfloat16`` or
``float16``. ``auto`` picks the first GPU in bfloat16 (float16 on a GPU without bfloat16) where one is present,
else the CPU in float32. A choice this machine cannot honour is refused with one sentence naming the fix, before
any weights are read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class PlacementError(ValueError):
    """A device or dtype this machine cannot provide."""


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "float32", "bfloat16" or "float16"

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def _cuda_facts() -> tuple[int, bool]:
    """How many GPUs torch sees, and whether the first one does bfloat16."""
    import torch

    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported())


def cuda_facts_without_torch(proc_root: Path = Path("/proc/driver/nvidia/gpus")) -> tuple[int, bool]:
    """GPU count as torch would see it, without importing torch (the endpoint's router must stay torch-free): the
    NVIDIA driver's GPU list, narrowed by ``CUDA_VISIBLE_DEVICES``. bfloat16 is assumed (it only picks between two
    2-byte dtypes; the deployment process resolves for real)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    present = len(list(proc_root.iterdir())) if proc_root.is_dir() else 0
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip()]
        if any(v.strip().startswith("-") for v in entries[:1]):
            return 0, False
        present = min(present, len(entries)) if present else 0
    return present, present > 0


def resolve_placement(
    device: str = "auto", dtype: str = "auto", *, cuda_facts: tuple[int, bool] | None = None
) -> Placement:
    """The concrete device and dtype for a ``device``/``dtype`` choice on this machine.

    ``cuda_facts`` (GPU count, bfloat16 support) replaces asking torch, so the GPU rules are testable anywhere.
    """
    if not re.match(DEVICE_PATTERN, device or ""):
        raise PlacementError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N; pick one of those")
    if dtype not in DTYPES:
        raise PlacementError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pick one of those")
    gpus, bf16 = cuda_facts if cuda_facts is not None else _cuda_facts()
    if device == "auto":
        device = "cuda:0" if gpus else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1])
        if gpus == 0:
            raise PlacementError(
                f"device {device!r} needs a CUDA GPU but torch sees none on this machine; use device 'cpu' or 'auto'"
            )
        if index >= gpus:
            raise PlacementError(
                f"device {device!r} does not exist: torch sees {gpus} GPU(s) (cuda:0 to cuda:{gpus - 1}); "
                "pick one of those"
            )
    if dtype == "auto":
        dtype = ("bfloat16" if bf16 else "float16") if device.startswith("cuda") else "float32"
    elif dtype == "float16" and device == "cpu":
        raise PlacementError("dtype 'float16' is not supported on the CPU; use float32 (or bfloat16) there")
    return Placement(device, dtype)


def load_causal_lm(model_dir: Any, placement: Placement) -> Any:
    """A causal LM from a Hugging Face folder, on ``placement``'s device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.torch_dtype())
    model.to(placement.device)
    model.eval()
    return model


__all__ = [
    "DEVICE_PATTERN",
    "DTYPES",
    "Placement",
    "PlacementError",
    "cuda_facts_without_torch",
    "load_causal_lm",
    "resolve_placement",
]
