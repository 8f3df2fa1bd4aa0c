"""The lower bound for a no-op verification that still catches a removed package (issue 9).

Run it with the TARGET interpreter (the one ComfyUI runs in; it needs `packaging`, which every
ComfyUI venv has): it reads every requirement file and spec given, like `pip install` does, and
checks each requirement with `importlib.metadata` + `packaging` (markers evaluated, version
specifiers checked). Exit 0 when everything is satisfied, 1 with one line per problem otherwise.

    /workspace/venv/bin/python bench/lower_bound.py -r ComfyUI/requirements.txt \\
        -r ComfyUI/custom_nodes/*/requirements.txt 'transformers>=4.28.1' ...

Stdlib + packaging only, on purpose: it is what a minimal hand-written check costs, the figure a
pod-agent no-op `install`/`status` is compared with (bench/bench_noop.py).
"""

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version


def requirements(args):
    """(source, requirement text) for every `-r FILE` (followed, with its own -r includes) and
    bare spec in args."""
    import os

    seen = set()

    def read(path):
        path = os.path.abspath(path)
        if path in seen:
            return
        seen.add(path)
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read().replace("\\\n", "")
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("-r ", "--requirement ")):
                yield from read(os.path.join(os.path.dirname(path), line.split(None, 1)[1]))
                continue
            if line.startswith("-"):
                continue  # installer options
            yield f"{path}:{number}", line.split(" --")[0].strip()

    it = iter(args)
    for arg in it:
        if arg in ("-r", "--requirement"):
            yield from read(next(it))
        else:
            yield "argument", arg


def main(argv):
    problems = []
    count = 0
    for where, text in requirements(argv):
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue  # URLs, local paths: not checkable by name
        count += 1
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{where}: {req.name} not installed")
            continue
        if req.specifier:
            try:
                ok = req.specifier.contains(Version(installed), prereleases=True)
            except InvalidVersion:
                ok = True
            if not ok:
                problems.append(f"{where}: {req.name} {installed} installed, {req.specifier} "
                                "wanted")
    for line in problems:
        print(line)
    print(f"{count} requirements checked, {len(problems)} unmet", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
