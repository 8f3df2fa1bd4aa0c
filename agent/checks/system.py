"""`disk` (free space on the volume and the container disk) and `gpu` (nvidia-smi)."""

from __future__ import annotations

import os
import shutil

from agent import procs
from agent.checks.base import CheckCtx, Result

GIB = 2**30
QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu"


def disk(ctx: CheckCtx) -> Result:
    s = ctx.settings
    seen: set[int] = set()
    rows, worst, notes = [], "ok", []
    for raw in s["paths"]:
        path = os.path.expanduser(str(raw))
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue  # not there (yet): nothing to measure
        if dev in seen:
            continue
        seen.add(dev)
        try:
            usage = shutil.disk_usage(path)
        except OSError as exc:
            rows.append({"path": path, "error": str(exc)})
            notes.append(f"{path}: {exc.strerror or exc}")
            worst = "fail"
            continue
        free_gb = usage.free / GIB
        row = {"path": path, "free": usage.free, "total": usage.total,
               "used_percent": round(100 * usage.used / usage.total, 1) if usage.total else None}
        rows.append(row)
        level = "fail" if free_gb < s["fail_free_gb"] else \
            "warn" if free_gb < s["warn_free_gb"] else "ok"
        notes.append(f"{path}: {free_gb:.1f} GiB free of {usage.total / GIB:.1f} GiB"
                     + ("" if level == "ok" else
                        f" (below {s['fail_free_gb' if level == 'fail' else 'warn_free_gb']:g}"
                        " GiB)"))
        if level == "fail" or (level == "warn" and worst == "ok"):
            worst = level
    if not rows:
        return Result("skip", "none of the configured paths exists", data={"paths": []})
    return Result(worst, "; ".join(notes), data={"paths": rows}, actionable=False)


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def gpu(ctx: CheckCtx) -> Result:
    s = ctx.settings
    exe = shutil.which(s["nvidia_smi"])
    if exe is None:
        return Result("skip", f"{s['nvidia_smi']} not found (no NVIDIA driver tools)")
    code, out = procs.quick([exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                            timeout=ctx.remaining())
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    if code != 0:
        last = lines[-1] if lines else f"exit {code}"
        return Result("fail", f"nvidia-smi failed: {last[:300]}", actionable=False)
    gpus, hot, notes = [], [], []
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 6:
            continue
        idx, name, util, used, total, temp = cells[:6]
        row = {"index": int(_num(idx) or 0), "name": name, "utilization": _num(util),
               "memory_used_mib": _num(used), "memory_total_mib": _num(total),
               "temperature": _num(temp)}
        gpus.append(row)
        notes.append(f"GPU{row['index']} {name}: {util}% util, {used}/{total} MiB, {temp} C")
        if row["temperature"] is not None and row["temperature"] >= s["warn_temp"]:
            hot.append(f"GPU{row['index']} at {temp} C")
    if not gpus:
        return Result("fail", "nvidia-smi listed no GPU", data={"gpus": []}, actionable=False)
    if hot:
        return Result("warn", "hot: " + ", ".join(hot) + "; " + "; ".join(notes),
                      data={"gpus": gpus})
    return Result("ok", "; ".join(notes), data={"gpus": gpus})
