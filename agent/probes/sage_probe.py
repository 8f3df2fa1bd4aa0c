"""SageAttention probe: runs in ComfyUI's interpreter as its own process, never in the agent.

    python sage_probe.py '{"tolerance": 0.05}'

Prints one line per stage, `POD_AGENT_PROBE {json}`, flushed as it goes, so a hang or a crash
still tells how far the probe got. Stages: start, torch (version, CUDA version), gpu (torch sees
the device: name, capability), import (sageattention: version, or why not), kernel (a tiny real
`sageattn` call compared with torch's scaled_dot_product_attention), done. A failed stage is the
last line (`"ok": false`) and the exit status is 0; anything else (a signal, no `done`) is a
crash or a hang, judged by the agent.

Import success is not evidence: "SM90 kernel is not available" and similar only show when a
kernel is launched (SageAttention #173), hence the kernel stage.
"""

import json
import sys

PREFIX = "POD_AGENT_PROBE "


def emit(stage, **fields):
    fields = {"stage": stage, **fields}
    sys.stdout.write(PREFIX + json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()


def error(exc):
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def main():
    try:
        args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    except ValueError:
        args = {}
    tolerance = float(args.get("tolerance", 0.05))
    emit("start", python=sys.version.split()[0], executable=sys.executable)

    try:
        import torch
    except BaseException as exc:  # noqa: BLE001 - whatever it is, it is the answer
        emit("torch", ok=False, error=error(exc))
        return
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    emit("torch", ok=True, torch=str(getattr(torch, "__version__", "?")), cuda=cuda)

    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    except BaseException as exc:  # noqa: BLE001
        emit("gpu", ok=False, error=error(exc))
        return
    if not available or count < 1:
        emit("gpu", ok=False, error="torch.cuda.is_available() is False"
             + ("" if cuda else " (a CPU-only torch build)"))
        return
    try:
        name = str(torch.cuda.get_device_name(0))
        major, minor = torch.cuda.get_device_capability(0)
    except BaseException as exc:  # noqa: BLE001
        emit("gpu", ok=False, error=error(exc))
        return
    emit("gpu", ok=True, gpu=name, capability=f"{major}.{minor}", devices=count)

    try:
        import sageattention
        from sageattention import sageattn
    except BaseException as exc:  # noqa: BLE001
        missing = isinstance(exc, ModuleNotFoundError) and \
            getattr(exc, "name", None) == "sageattention"
        text = error(exc)
        kind = "missing" if missing else "abi" if "undefined symbol" in text else "import"
        emit("import", ok=False, kind=kind, error=text)
        return
    version = None
    try:
        from importlib import metadata

        version = metadata.version("sageattention")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata
        version = getattr(sageattention, "__version__", None)
    emit("import", ok=True, version=version, file=getattr(sageattention, "__file__", None))

    try:
        torch.manual_seed(0)
        shape = (1, 2, 128, 64)  # batch, heads, tokens, head_dim ("HND")
        q, k, v = (torch.randn(*shape, dtype=torch.float16, device="cuda") for _ in range(3))
        out = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        torch.cuda.synchronize()
    except BaseException as exc:  # noqa: BLE001
        emit("kernel", ok=False, kind="launch", error=error(exc))
        return
    try:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        got, want = out.float(), ref.float()
        finite = bool(torch.isfinite(got).all().item())
        diff = got - want
        rel = float((diff.norm() / want.norm()).item()) if finite else None
        max_abs = float(diff.abs().max().item()) if finite else None
    except BaseException as exc:  # noqa: BLE001
        emit("kernel", ok=False, kind="compare", error=error(exc))
        return
    ok = finite and rel is not None and rel <= tolerance
    emit("kernel", ok=ok, kind=None if ok else "mismatch", rel_error=rel, max_abs_error=max_abs,
         tolerance=tolerance, finite=finite, shape=list(shape))
    if ok:
        emit("done", ok=True)


if __name__ == "__main__":
    main()
