"""Requirement files as pip reads them, checked against an interpreter without calling pip."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from agent.pyenv import PyEnv, PythonUnavailable, canonical, inspect
from agent.reqs import files_digest, parse_spec, read_file, unmet, versions

ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "implementation_version": "3.11.7", "platform_release": "6", "platform_version": "6"}


def pyenv(**dists: str) -> PyEnv:
    return PyEnv(python=Path("/venv/bin/python"), dists={canonical(k): v for k, v in dists.items()},
                 env=ENV, prefix="/venv")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


def test_comments_blank_lines_and_options_are_skipped(tmp_path):
    path = write(tmp_path, "requirements.txt", """\
        # ComfyUI requirements
        --index-url https://download.pytorch.org/whl/cu121
        --extra-index-url https://example.invalid/simple
        -f ./wheels
        --pre

        torch  # the image's CUDA build
        torchsde
        einops>=0.6 --hash=sha256:0123abcd
        transformers>=4.28.1
        Pillow
        """)
    reqs, files = read_file(path)
    assert names(reqs) == ["torch", "torchsde", "einops", "transformers", "pillow"]
    assert files == [path]
    einops = reqs[2].requirement
    assert str(einops.specifier) == ">=0.6"
    assert reqs[2].source == f"{path}:9"


def test_includes_are_followed_relative_to_the_file_and_cycles_stop(tmp_path):
    main = write(tmp_path, "requirements.txt", "-r extra/more.txt\nalpha\n"
                 "--requirement=extra/more.txt\n-c constraints.txt\n")
    more = write(tmp_path, "extra/more.txt", "beta\n-r ../requirements.txt\n")
    write(tmp_path, "constraints.txt", "gamma==1.0\n")
    reqs, files = read_file(main)
    assert names(reqs) == ["beta", "alpha"]  # constraints are not requirements
    assert files == [main, more]


def test_missing_include_is_ignored_by_the_reader(tmp_path):
    path = write(tmp_path, "r.txt", "-r nope.txt\nalpha\n")
    reqs, files = read_file(path)
    assert names(reqs) == ["alpha"]


def test_url_editable_and_direct_references(tmp_path):
    path = write(tmp_path, "r.txt", """\
        git+https://github.com/org/thing.git@v1#egg=Thing_Pkg
        -e git+https://github.com/org/editable.git#egg=edit-me
        https://example.invalid/archive/main.zip#egg=zipped&subdirectory=x
        named @ https://example.invalid/named-1.0-py3-none-any.whl
        ./local/folder
        /abs/wheel-1.0-py3-none-any.whl
        git+https://github.com/org/no-egg.git
        """)
    reqs, _ = read_file(path)
    assert names(reqs) == ["thing-pkg", "edit-me", "zipped", "named"]
    # Checked by presence (no version to compare):
    problems = unmet(reqs, pyenv(thing_pkg="1.0", named="1.0"))
    assert problems == ["edit-me not installed in /venv", "zipped not installed in /venv"]
    assert unmet(reqs, pyenv(thing_pkg="1", edit_me="1", zipped="1")) == [
        "named not installed in /venv"]
    assert unmet(reqs, pyenv(thing_pkg="1", edit_me="1", zipped="1", named="9")) == []


def test_line_continuations(tmp_path):
    path = write(tmp_path, "r.txt",
                 "alpha>=1.0 \\\n    --hash=sha256:abc \\\n    --hash=sha256:def\nbeta\n")
    reqs, _ = read_file(path)
    assert names(reqs) == ["alpha", "beta"]
    assert str(reqs[0].requirement.specifier) == ">=1.0"


def test_markers_are_evaluated_for_the_target_interpreter(tmp_path):
    path = write(tmp_path, "r.txt", """\
        futures; python_version < "3"
        pywin32; sys_platform == "win32"
        uvloop; sys_platform == "linux"
        tomli; python_version < "3.11"
        """)
    reqs, _ = read_file(path)
    assert unmet(reqs, pyenv()) == ["uvloop not installed in /venv"]
    assert unmet(reqs, pyenv(uvloop="0.19")) == []


@pytest.mark.parametrize("spec, installed, problem", [
    ("alpha", {}, "alpha not installed in /venv"),
    ("alpha", {"alpha": "0.1"}, None),
    ("alpha>=2.0", {"alpha": "1.0"}, "alpha 1.0 installed in /venv, >=2.0 wanted"),
    ("alpha>=2.0,<3", {"alpha": "2.5"}, None),
    ("alpha==1.0", {"alpha": "1.0.0"}, None),
    ("Foo_Bar.baz>=1", {"foo-bar-baz": "1.2"}, None),  # names compare canonically
    ("alpha>=1.0", {"alpha": "2.0rc1"}, None),  # an installed pre-release still satisfies
    ("alpha[extra]>=1", {"alpha": "1.5"}, None),
    ("alpha~=1.4", {"alpha": "2.0"}, "alpha 2.0 installed in /venv, ~=1.4 wanted"),
])
def test_unmet(spec, installed, problem, tmp_path):
    path = write(tmp_path, "r.txt", spec + "\n")
    reqs, _ = read_file(path)
    assert unmet(reqs, pyenv(**installed)) == ([problem] if problem else [])


def test_versions_lists_what_is_installed_once(tmp_path):
    path = write(tmp_path, "r.txt", "alpha\nbeta>=1\nalpha>=0.5\nmissing\n")
    reqs, _ = read_file(path)
    assert versions(reqs, pyenv(alpha="2.0", beta="1.1")) == "alpha==2.0, beta==1.1"


def test_digest_follows_contents_of_included_files(tmp_path):
    main = write(tmp_path, "r.txt", "-r inc.txt\nalpha\n")
    inc = write(tmp_path, "inc.txt", "beta\n")
    _, files = read_file(main)
    before = files_digest(files)
    assert files_digest(read_file(main)[1]) == before  # stable
    inc.write_text("beta>=2\n")
    assert files_digest(read_file(main)[1]) != before
    main.write_text("-r inc.txt\nalpha  \n")
    assert files_digest(read_file(main)[1]) != before


@pytest.mark.parametrize("spec", ["transformers>=4.28.1", "torch==2.3.1+cu121",
                                  "kornia>=0.7.1", "pywin32; sys_platform == 'win32'",
                                  "x @ https://example.invalid/x.whl"])
def test_parse_spec_accepts_pep508(spec):
    assert parse_spec(spec)


@pytest.mark.parametrize("spec", ["transformers>=4.28.1 >", "torch sde", ">=1.0", "a==",
                                  "pkg>=1.0 --hash"])
def test_parse_spec_rejects_with_one_line(spec):
    with pytest.raises(ValueError) as err:
        parse_spec(spec)
    message = str(err.value)
    assert "\n" not in message and repr(spec) in message


def test_inspect_reads_the_target_interpreter():
    env = inspect(Path(sys.executable))
    assert "packaging" in env.dists and "pyyaml" in env.dists
    assert env.env["python_version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert env.prefix == sys.prefix


def test_inspect_missing_interpreter(tmp_path):
    with pytest.raises(PythonUnavailable, match="does not exist"):
        inspect(tmp_path / "nope" / "python")
