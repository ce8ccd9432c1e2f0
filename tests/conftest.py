"""Shared pytest setup: the device every test runs on, and tiny models.

On a machine with CUDA the suite checks the compiled Triton kernels; without one it runs the same
kernels in Triton's interpreter on the CPU. The interpreter is chosen by TRITON_INTERPRET, which
Triton reads when a kernel is *defined*, so it is set here, before any test module imports
`lofit_fast` (and through it `lofit_fast.kernels`). `import torch` does not import Triton.
"""

import atexit
import os
import shutil
import sys
import tempfile

# `python -m pytest` puts the working directory first on sys.path. Run from the repository root, its kernels/
# folder (installed as lofit_fast.kernels) would then be the top-level `kernels` module and shadow the Hugging
# Face package of that name, which transformers and bitsandbytes import. The tests import lofit_fast from its
# installation (pip install -e .), not from the root.
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _REPOSITORY]

# Fresh caches for every run, as on a clean CI machine: a warm torch.compile cache left in /tmp by an earlier run
# once hid a failure (a compiled backward that donates its saved buffers) that only a clean machine showed. The
# demo's pretrained base (lofit_fast.demo.cache_dir) likewise never comes from a user's cache.
_CACHES = tempfile.mkdtemp(prefix="lofit-tests-caches-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHES, "torch_compile")
os.environ["LOFIT_CACHE"] = os.path.join(_CACHES, "lofit_fast")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The test models are tiny: on a small or shared CPU, extra threads cost far more than they save
    # (measured: the core tests took 5m54 with 2 threads under load, 39 s with one).
    torch.set_num_threads(1)

import contextlib  # noqa: E402

import pytest  # noqa: E402

from bnb_cpu import CPU_KINDS, cpu_kind, has_real_repacking_kernel  # noqa: E402
from helpers import QUANTIZABLE_CONFIG, tiny_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when available (compiled kernels), else the CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture(scope="session")
def quantizable_base(tmp_path_factory):
    """The directory of a saved tiny Llama with shapes bitsandbytes' 4-bit CPU kernel accepts
    (helpers.QUANTIZABLE_CONFIG), for tests that load it quantized."""
    directory = tmp_path_factory.mktemp("quantizable_base")
    tiny_model("llama", **QUANTIZABLE_CONFIG).save_pretrained(directory)
    return directory


@pytest.fixture
def make_tiny_model(device):
    """`make_tiny_model(model_type, **config_overrides)`: a seeded tiny causal LM on `device`, eval mode."""
    def make(model_type: str = "llama", **overrides):
        return tiny_model(model_type, **overrides).to(device)

    return make


# LOFIT_TEST_CPU_KIND=avx512bf16 (or plain) runs the whole suite as on a CPU of that kind, as far as
# bitsandbytes' 4-bit layers can tell (see bnb_cpu.py): a machine of either kind checks the other's path.
_session_cpu_kind = contextlib.ExitStack()


def pytest_configure(config):
    kind = os.environ.get("LOFIT_TEST_CPU_KIND")
    if kind:
        if kind not in CPU_KINDS:
            raise pytest.UsageError(f"LOFIT_TEST_CPU_KIND must be one of {CPU_KINDS}, not {kind!r}")
        _session_cpu_kind.enter_context(cpu_kind(kind))


def pytest_unconfigure(config):
    _session_cpu_kind.close()


def pytest_report_header(config):
    """The versions and the CPU kind a run used, so that a failure after a new release names the release."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("torch", "transformers", "bitsandbytes", "triton", "peft", "trl", "accelerate"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    native = "avx512bf16" if has_real_repacking_kernel() else "plain"
    kind = os.environ.get("LOFIT_TEST_CPU_KIND") or native
    emulated = "" if kind == native else f" (emulated; this CPU is {native})"
    return [", ".join(versions), f"device: {DEVICE}; bitsandbytes 4-bit CPU kind: {kind}{emulated}"]
