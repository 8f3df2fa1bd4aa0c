"""`sageattention`: does SageAttention really work with this torch on this GPU?

Never imports torch or sageattention in the agent: agent/probes/sage_probe.py runs in ComfyUI's
interpreter (comfyui.python, with comfyui.env) as a process in its own session with a timeout
that kills its whole group. Stages and what they mean:

- no NVIDIA device (agent.gpu.has_gpu)       -> skip "no GPU"; never a reason to reinstall
- torch does not import / cannot use the GPU -> fail; reinstalling SageAttention cannot help
- sageattention missing                      -> fail "not installed"
- import error with "undefined symbol"       -> fail "ABI mismatch" (built for another torch)
- the kernel launch raises, or its result differs from torch's scaled_dot_product_attention
  beyond `tolerance` (relative L2 error)     -> fail (an import that works is not proof)
- hang -> killed after the timeout; crash (a signal, no result) -> fail

Results are cached in <state_dir>/sageattention-probe.json by a fingerprint of what decides
them (torch and sageattention versions and files, the GPU's name and compute capability, the
component's marker, the probe itself) and re-run when it changes or after `cache_ttl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import time
from typing import Any

from agent import markers, procs
from agent.checks.base import CheckCtx, Result
from agent.markers import atomic_write, read_json
from agent.model import Config
from agent.probes import SAGE_PROBE

PREFIX = "POD_AGENT_PROBE "
CACHE_FILE = "sageattention-probe.json"
CACHE_KEEP = 10
NEXT_STAGE = {"start": "torch", "torch": "gpu", "gpu": "import", "import": "kernel",
              "kernel": "compare"}
PACKAGE_STAGES = ("import", "kernel", "compare")  # failures a reinstall can fix

_FP_SCRIPT = r"""
import json, os
from importlib import metadata, util
out = {}
for name in ("torch", "sageattention"):
    try:
        out[name] = metadata.version(name)
    except Exception:
        out[name] = None
    try:
        spec = util.find_spec(name)
        origin = spec.origin if spec is not None else None
        out[name + "_file"] = [origin, os.stat(origin).st_mtime_ns] if origin else None
    except Exception as exc:
        out[name + "_file"] = repr(exc)[:200]
print(json.dumps(out))
"""


def probe_log(config: Config):
    return config.workspace / "logs" / "sageattention-probe.log"


def _env(config: Config) -> dict[str, str]:
    return dict(config.comfyui.env)


def _gpu_identity(timeout: float) -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown"
    code, out = procs.quick([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                            timeout=timeout)
    return out.strip() if code == 0 else "unknown"


def fingerprint(ctx: CheckCtx, marker_stamp: str | None) -> tuple[str, dict[str, Any]]:
    config = ctx.config
    code, out = procs.quick([str(config.comfyui.python), "-c", _FP_SCRIPT],
                            timeout=min(30.0, ctx.remaining()), env=_env(config))
    try:
        versions = json.loads(out.strip().splitlines()[-1]) if code == 0 else {}
    except (ValueError, IndexError):
        versions = {}
    parts = {
        "python": str(config.comfyui.python),
        "versions": versions,
        "gpu": _gpu_identity(min(10.0, ctx.remaining())),
        "marker": marker_stamp,
        "probe": hashlib.sha256(SAGE_PROBE.read_bytes()).hexdigest()[:12],
        "tolerance": ctx.settings["tolerance"],
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return digest, parts


# ------------------------------------------------------------------ the probe
def run_probe(config: Config, timeout: float, tolerance: float) -> tuple[int, bool, list[dict]]:
    """(exit status, timed out, stage events) of one probe run; its output is kept in
    <workspace>/logs/sageattention-probe.log (the last run only)."""
    log = probe_log(config)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    cmd = [str(config.comfyui.python), str(SAGE_PROBE), json.dumps({"tolerance": tolerance})]
    result = procs.run(cmd, log=log, timeout=timeout, env=_env(config),
                       title="sageattention probe")
    events = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(PREFIX):
            try:
                events.append(json.loads(line[len(PREFIX):]))
            except ValueError:
                continue
    return result.returncode, result.timed_out, events


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def interpret(code: int, timed_out: bool, events: list[dict], timeout: float,
              python: str) -> tuple[Result, bool]:
    """(result, definitive): definitive results are cached; hangs and crashes are not."""
    info: dict[str, Any] = {}
    for ev in events:
        for k in ("torch", "cuda", "gpu", "capability", "version", "rel_error", "max_abs_error",
                  "tolerance", "python"):
            if k in ev and ev[k] is not None:
                info[k] = _finite(ev[k])
    last = events[-1] if events else {"stage": "start", "ok": True}
    stage = last.get("stage", "start")
    info["stage"] = stage
    gpu = f"{info.get('gpu', 'the GPU')}" + (f" (sm_{info['capability'].replace('.', '')})"
                                             if info.get("capability") else "")
    tv = f"torch {info.get('torch', '?')}" + (f", CUDA {info['cuda']}" if info.get("cuda")
                                              else "")
    if timed_out:
        during = NEXT_STAGE.get(stage, stage) if last.get("ok", True) else stage
        info["stage"] = during
        return Result("fail", f"probe timed out after {timeout:g}s during the {during} stage "
                              "(hung; process group killed)", data=info, actionable=False), False
    if stage == "done":
        return Result("ok", f"sageattention {info.get('version') or '?'} kernel ok on {gpu}: "
                            f"{tv}; relative error {info.get('rel_error', 0):.2g} vs torch SDPA "
                            f"(tolerance {info.get('tolerance', 0):g})", data=info), True
    if last.get("ok") is False:
        err = last.get("error") or ""
        kind = last.get("kind")
        info["kind"] = kind
        info["error"] = err
        if stage == "torch":
            return Result("fail", f"torch does not import in {python}: {err}", data=info,
                          actionable=False), False
        if stage == "gpu":
            return Result("fail", f"{tv} cannot use the GPU: {err}", data=info,
                          actionable=False), False
        if stage == "import" and kind == "missing":
            return Result("fail", f"sageattention is not installed in {python}", data=info), True
        if stage == "import" and kind == "abi":
            return Result("fail", f"ABI mismatch: sageattention was built for another torch than "
                                  f"{tv}: {err}", data=info), True
        if stage == "import":
            return Result("fail", f"sageattention does not import: {err}", data=info), True
        if kind == "mismatch":
            rel = info.get("rel_error")
            what = f"relative error {rel:.3g} > {info.get('tolerance', 0):g}" \
                if isinstance(rel, (int, float)) else "non-finite output"
            return Result("fail", f"sageattention {info.get('version') or '?'} kernel result "
                                  f"differs from torch SDPA on {gpu}: {what}", data=info), True
        return Result("fail", f"sageattention {info.get('version') or '?'} kernel failed on "
                              f"{gpu}: {err}", data=info), True
    # no clean end: a crash
    during = NEXT_STAGE.get(stage, stage)
    info["stage"] = during
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}"
    return Result("fail", f"probe crashed ({how}) during the {during} stage", data=info,
                  actionable=during in PACKAGE_STAGES), False


# ------------------------------------------------------------------ cache
def _cache_path(config: Config):
    return config.state_dir / CACHE_FILE


def _load_cache(config: Config) -> dict[str, Any]:
    data = read_json(_cache_path(config))
    return data if data is not None and isinstance(data.get("entries"), dict) \
        else {"entries": {}}


def _save_cache(config: Config, fp: str, result: Result) -> None:
    data = _load_cache(config)
    entries = data["entries"]
    entries[fp] = {"time": time.time(), "status": result.status, "detail": result.detail,
                   "data": result.data, "actionable": result.actionable}
    if len(entries) > CACHE_KEEP:
        for key in sorted(entries, key=lambda k: entries[k].get("time", 0))[:-CACHE_KEEP]:
            del entries[key]
    try:
        atomic_write(_cache_path(config), json.dumps(data, indent=1))
    except OSError:
        pass


# ------------------------------------------------------------------ the check
def check(ctx: CheckCtx) -> Result:
    config, s = ctx.config, ctx.settings
    name = s["component"]
    comp = config.components.get(name)
    mode = config.comfyui.sage_attention
    if mode == "off":
        return Result("skip", "not used (comfyui.sage_attention: off)")
    if (comp is None or not comp.enabled) and mode != "on":
        return Result("skip", f"not configured (no enabled component '{name}')")
    if not ctx.gpu():
        return Result("skip", "no GPU")
    python = config.comfyui.python
    if not python.exists():
        return Result("fail", f"ComfyUI's interpreter {python} does not exist", actionable=False)
    marker = markers.read(config.markers_dir, name) if comp is not None else None
    fp, parts = fingerprint(ctx, marker.timestamp if marker else None)
    entry = _load_cache(config)["entries"].get(fp)
    if entry and not ctx.force and time.time() - entry.get("time", 0) < s["cache_ttl"]:
        age = time.time() - entry["time"]
        result = Result(entry["status"], entry["detail"] + f" (cached {age / 60:.0f} min ago)",
                        data=dict(entry.get("data") or {}, cached=True),
                        actionable=entry.get("actionable", True))
    else:
        timeout = round(ctx.remaining(1.0), 1)
        try:
            code, timed_out, events = run_probe(config, timeout, s["tolerance"])
        except OSError as exc:  # its log cannot be written (a full or read-only volume)
            from agent.fserr import describe

            return Result("fail", f"cannot run the probe: {describe(exc)}", actionable=False,
                          data={"fingerprint": fp})
        result, definitive = interpret(code, timed_out, events, timeout, str(python))
        if definitive:
            _save_cache(config, fp, result)
    result.data.update(fingerprint=fp, marker=marker.timestamp if marker else None,
                       gpu_id=parts["gpu"])
    if result.status == "ok":
        result.healthy = (name,)
    elif result.status == "fail" and result.actionable:
        if marker is not None:
            result.targets = (name,)
        else:
            result.detail += " (no marker: the reconcile loop installs it)"
    if result.status == "fail":
        result.detail += f"; probe output: {probe_log(config)}"
    return result


def flag_blocked(entry: dict | None, config: Config, component: str = "sageattention"
                 ) -> str | None:
    """Why --use-sage-attention must not be passed now: the latest probe failed for the
    current install (same marker); None when there is no such evidence."""
    if not entry or entry.get("status") != "fail":
        return None
    data = entry.get("data") or {}
    if data.get("stage") not in PACKAGE_STAGES or "marker" not in data:
        return None
    marker = markers.read(config.markers_dir, component)
    if (marker.timestamp if marker else None) != data.get("marker"):
        return None  # reinstalled since: give the new build its chance
    return entry.get("detail")
