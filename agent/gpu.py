"""Is there an NVIDIA GPU? Cheap, honest, and never imports torch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent import procs


def has_gpu() -> bool:
    forced = os.environ.get("POD_AGENT_GPU")
    if forced in ("0", "1"):
        return forced == "1"
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if shutil.which("nvidia-smi"):
        code, out = procs.quick(["nvidia-smi", "-L"], timeout=10)
        return code == 0 and "GPU" in out
    return False
