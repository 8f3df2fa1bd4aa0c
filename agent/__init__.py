"""comfy-pod-agent: keeps a ComfyUI GPU pod installed, healthy and running."""

__version__ = "0.1.0"
