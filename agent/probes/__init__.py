"""Scripts that run inside ComfyUI's interpreter (never imported by the agent itself)."""

from pathlib import Path

SAGE_PROBE = Path(__file__).with_name("sage_probe.py")
