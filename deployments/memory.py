"""A deployment's memory before it loads: its size from the safetensors headers, checked against its limit and the
machine, so that a model that cannot fit fails to create (like Azure's quota refusal) instead of being killed
mid-load; and the kernel's OOM preference between deployments (``oom_score_adj``).

No torch here: a safetensors file starts with an 8-byte little-endian header length and a JSON header giving each
tensor's dtype and shape, which is all the size check needs.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MB = 1024 * 1024
# Address space of a deployment process besides its weights: torch and transformers imported (about 0.7 GB of
# VmSize on a 2-core CPU machine, 2026-12-01; 1.1-1.2 GB VmPeak once the tiny model had loaded), plus room for
# activations and a batch's KV cache.
RUNTIME_ADDRESS_SPACE_MB = 1536
# Resident memory of the same process without a model (measured about 0.25 GB RSS), for the machine check.
RUNTIME_RESIDENT_MB = 300
# Resident memory of a deployment's HTTP side when an engine process holds the model: FastAPI, uvicorn and the
# tokenizer without torch (measured 70 MB RSS with the tiny model's tokenizer, 2026-12-02).
HTTP_SIDE_RESIDENT_MB = 100
_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# How much higher a deployment without traffic scores than the live ones (0): the OOM killer picks it first.
IDLE_OOM_SCORE_ADJ = 500
LIVE_OOM_SCORE_ADJ = 0
MAX_OOM_SCORE_ADJ = 1000


class MemoryCheckError(ValueError):
    """The deployment cannot fit; the message names the sizes and what to change."""


@dataclass(frozen=True)
class ModelSize:
    files: int
    parameters: int
    bytes_on_disk: int
    float_parameters: int

    float_bytes_on_disk: int

    def bytes_as(self, dtype: str) -> int:
        """Bytes of the weights once loaded with floating-point tensors in ``dtype`` (others as stored)."""
        other = self.bytes_on_disk - self.float_bytes_on_disk
        return other + self.float_parameters * DTYPE_BYTES.get(dtype, 4)


def _header(path: Path) -> dict[str, object]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * MB:
            raise MemoryCheckError(f"{path} does not look like a safetensors file (header of {length} bytes)")
        return json.loads(handle.read(length))


def model_size(model_dir: Path) -> ModelSize:
    """Parameters and bytes of every ``*.safetensors`` file under ``model_dir``, from their headers alone."""
    files = sorted(Path(model_dir).rglob("*.safetensors"))
    parameters = on_disk = float_parameters = float_bytes = 0
    for path in files:
        for name, tensor in _header(path).items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            count = math.prod(int(n) for n in tensor.get("shape", []))
            dtype = str(tensor.get("dtype", "F32"))
            size = count * _BYTES.get(dtype, 4)
            parameters += count
            on_disk += size
            if dtype in _FLOAT:
                float_parameters += count
                float_bytes += size
    return ModelSize(len(files), parameters, on_disk, float_parameters, float_bytes)


def check_fits(
    model_dir: Path, dtype: str, limit_mb: int | None, instances: int, deployment: str, engine_process: bool = False
) -> ModelSize:
    """Raise :class:`MemoryCheckError` when ``instances`` copies of the model in ``dtype`` exceed the deployment's
    memory limit (per process: the one that holds the model) or the machine's available memory (all instances
    together, each with the HTTP side's process too where an engine process holds the model)."""
    size = model_size(model_dir)
    if size.files == 0:
        return size  # no safetensors file: nothing to measure here; the load itself says what is missing
    weights_mb = math.ceil(size.bytes_as(dtype) / MB)
    need_mb = weights_mb + RUNTIME_ADDRESS_SPACE_MB
    if limit_mb is not None and need_mb > limit_mb:
        raise MemoryCheckError(
            f"deployment {deployment!r} needs about {need_mb} MB per instance ({weights_mb} MB of weights in {dtype} "
            f"for {size.parameters:,} parameters + {RUNTIME_ADDRESS_SPACE_MB} MB for the runtime) but its memory "
            f"limit is {limit_mb} MB; raise endpoint.memory_limit_mb (like choosing a larger instance type) or "
            "deploy a smaller model or dtype"
        )
    available_mb = psutil.virtual_memory().available // MB
    runtime_mb = RUNTIME_RESIDENT_MB + (HTTP_SIDE_RESIDENT_MB if engine_process else 0)
    resident_mb = instances * (weights_mb + runtime_mb)
    if resident_mb > available_mb:
        raise MemoryCheckError(
            f"not enough memory for deployment {deployment!r}: {instances} instance(s) need about {resident_mb} MB "
            f"({weights_mb} MB of weights in {dtype} + {runtime_mb} MB each) but only {available_mb} MB are "
            "available on this machine; delete an unused deployment, lower its instance_count or free memory"
        )
    return size


def set_oom_score_adj(pid: int, value: int) -> bool:
    """Set the ``oom_score_adj`` of a process and its descendants (a deployment's engine process is its child, and
    a child inherits the score only when it starts). Lowering a score needs CAP_SYS_RESOURCE: False when refused."""
    done = True
    for each in process_tree(pid):
        try:
            Path(f"/proc/{each.pid}/oom_score_adj").write_text(str(value), encoding="ascii")
        except FileNotFoundError:
            continue  # it ended meanwhile
        except OSError as exc:
            log.warning("could not set oom_score_adj of process %d to %d: %s", each.pid, value, exc)
            done = False
    return done


def oom_score_adj(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 when it is gone)."""
    total = 0
    for process in process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total
