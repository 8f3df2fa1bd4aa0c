"""`folders` components: ComfyUI's standard model folders, and an optional
`extra_model_paths.yaml` for models kept elsewhere on the volume.

The probe is cheap (each folder exists; the extra paths file says what the config says), so the
agent notices a missing folder at its start and at every reconcile, and recreates it, as the
original template's start script did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from agent.kinds.base import Ctx, Problem
from agent.model import Component, Marker, State

STANDARD = ("checkpoints", "loras", "vae", "clip", "text_encoders", "unet", "diffusion_models",
            "clip_vision", "controlnet", "upscale_models", "embeddings")

FIELDS = {
    "root": ("path", "{comfyui}/models"),
    "folders": ("list[str]", STANDARD),
    "extra_model_paths": ("any", None),
    "extra_model_paths_file": ("path", "{comfyui}/extra_model_paths.yaml"),
}
RESTART_COMFYUI = False  # folders need no restart; set it true when extra_model_paths changes
HEADER = "# Written by pod-agent from its config (a `folders` component); edit the config.\n"


def _bad(text: str, key: str) -> ValueError:
    err = ValueError(text)
    err.key = key  # type: ignore[attr-defined]
    return err


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    for name in values["folders"]:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise _bad(f"'folders': {name!r} must be a folder name under 'root'", "folders")
    extra = values["extra_model_paths"]
    if extra is not None:
        if not isinstance(extra, dict):
            raise _bad("'extra_model_paths' must be a mapping of section names to mappings "
                       "(base_path: ..., checkpoints: ..., ...)", "extra_model_paths")
        clean: dict[str, dict[str, str]] = {}
        for section, body in extra.items():
            if not isinstance(body, dict) or not all(
                    isinstance(v, (str, int, float)) and not isinstance(v, bool)
                    for v in body.values()):
                raise _bad(f"'extra_model_paths': section {section!r} must map folder kinds "
                           "to paths (strings)", "extra_model_paths")
            clean[str(section)] = {str(k): expand(str(v)) for k, v in body.items()}
        values["extra_model_paths"] = clean
    values["folders"] = tuple(values["folders"])
    return values


def render(comp: Component) -> str | None:
    import yaml

    extra = comp.spec["extra_model_paths"]
    return None if extra is None else HEADER + yaml.safe_dump(extra, sort_keys=False)


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    s = comp.spec
    return {"root": str(s["root"]), "folders": list(s["folders"]), "extra": render(comp),
            "extra_file": str(s["extra_model_paths_file"])}


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    s = comp.spec
    missing = [f for f in s["folders"] if not (Path(s["root"]) / f).is_dir()]
    if missing:
        return Problem(State.BROKEN, f"model folder{'s' if len(missing) > 1 else ''} missing: "
                       + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    text = render(comp)
    if text is not None:
        path = Path(s["extra_model_paths_file"])
        try:
            if path.read_text(encoding="utf-8") != text:
                return Problem(State.BROKEN, f"{path} differs from the config")
        except FileNotFoundError:
            return Problem(State.BROKEN, f"{path} is missing")
    return None


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    from agent.markers import atomic_write

    s = comp.spec
    for f in s["folders"]:
        (Path(s["root"]) / f).mkdir(parents=True, exist_ok=True)
    text = render(comp)
    if text is not None:
        path = Path(s["extra_model_paths_file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return current_meta(comp, ctx)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    return {"version": f"{len(comp.spec['folders'])} folders"}
