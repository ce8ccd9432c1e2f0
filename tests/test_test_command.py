"""The test command, run from the repository root, must not let the repository's `kernels/` folder (shipped as
`lofit_fast.kernels`) shadow the Hugging Face `kernels` package, which transformers and bitsandbytes import.

`python -m` puts the working directory first on sys.path, so from the root `import kernels` would find the
folder; the README's command does not do that, and tests/conftest.py takes the root off sys.path for those who
type `python -m pytest` anyway. Each command is run on the one check below, in a fresh process.
"""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = "tests/test_test_command.py::test_kernels_is_not_the_repository_folder"


def readme_test_command() -> list[str]:
    """The pytest command of README.md's Quick start (the second line of its first fenced block, after `&&`),
    as .ci/run reads it, split into words."""
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as file:
        lines = file.read().split("## Quick start", 1)[1].splitlines()
    fence = [i for i, line in enumerate(lines) if line.startswith("```")][0]
    return shlex.split(lines[fence + 2].split("&&")[-1])


def test_kernels_is_not_the_repository_folder():
    spec = importlib.util.find_spec("kernels")
    folder = os.path.join(REPOSITORY, "kernels")
    assert spec is None or not os.path.abspath(spec.origin).startswith(folder + os.sep), (
        f"`import kernels` finds {spec.origin}; sys.path starts {sys.path[:3]}")
    import lofit_fast.kernels  # the folder is still the library's subpackage

    assert os.path.dirname(os.path.abspath(lofit_fast.kernels.__file__)) == folder


@pytest.mark.parametrize("command", ["readme", "python -m pytest"])
def test_the_test_command_from_the_repository_root_does_not_shadow_kernels(command):
    words = readme_test_command() if command == "readme" else [sys.executable, "-m", "pytest", "tests", "-q"]
    assert "tests" in words, words
    words = [CHECK if word == "tests" else word for word in words] + ["-p", "no:cacheprovider"]
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(words, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(words)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
