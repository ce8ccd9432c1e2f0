"""Every kernel variant compiles to a cubin for sm_80, sm_86, sm_89 and sm_90, on a machine without a GPU.

`lofit_fast.kernels.cross_compile.CrossCompiler` puts a compile-only Triton driver for the target in place and
builds the kernels with `HeadAffineKernels(compile_only=True)`; each variant of `kernel_variants.VARIANTS` (the
list that `test_ops.test_kernel_variant_matches_torch` runs) goes through the real launchers with meta tensors:
argument specialization, autotune key and pruning as on a GPU, then Triton's compiler and the ptxas of the
triton wheel. A variant passes when every launch produced a cubin that spills no registers.

Each launch compiles one of the configs that the pruning kept, the one compiled least often so far on that
target (larger tiles first, as fewer launches keep them); then, for each target, any config that some launch
kept but none compiled is compiled on such a launch. So every kept config of every kernel compiles for every
target, at about a third of the cost of compiling all of them on every launch. The launches training makes on a
Llama-2-7B layer (`every_config`) compile every config they keep: which config spills can depend on the variant
and the target (one did, on sm_80 only).

Where Triton runs in its interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU), its own @jit
library (tl.max, tl.sum, ...) was built for the interpreter and cannot be compiled, so the compiling happens in
fresh processes without that variable: this file run as a script, the targets spread over one process per CPU
(at most one per target), in parallel.
"""

import collections
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

from lofit_fast.kernels import cross_compile  # noqa: E402
from lofit_fast.ops import triton_interpreter_enabled  # noqa: E402

from kernel_variants import DTYPES, HEAD_DIMS, LAYOUTS, SELECTIONS, SIZES, VARIANTS, launch, make_inputs  # noqa: E402

REASON = cross_compile.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot compile for CUDA targets without a GPU: {REASON}")

ARCHS = (80, 86, 89, 90)
VARIANTS_BY_ID = {variant.id: variant for variant in VARIANTS}


# ----------------------------------------------------------------------------------------------
# Compiling (in this process or in a worker)
# ----------------------------------------------------------------------------------------------

def _compile(variant, arch, preference):
    with cross_compile.CrossCompiler(arch, preference=preference) as compiler:
        launch(compiler, variant, make_inputs(variant, "meta"))
    return compiler.launches


def _problems(launches) -> list:
    """What is wrong with the binaries of some launches: nothing compiled, a missing cubin, spilled registers."""
    if not launches:
        return ["the launcher compiled nothing"]
    problems = []
    for one in launches:
        for config, kernel in one.compiled:
            if not kernel.asm.get("cubin"):
                problems.append(f"{one.kernel} {config}: no cubin")
                continue
            usage = cross_compile.resources(kernel.asm["cubin"])
            if usage["spills"]:
                problems.append(f"{one.kernel} {config}: spills ({usage})")
    return problems


def _error(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def compile_variants(variant_ids: list, archs: list) -> dict:
    """Compile the variants for each target; returns {"results": {"<id>@<arch>": problems}, "uncovered":
    {arch: problems}}: per launch what is wrong ([] when fine), per target the kept configs that did not
    compile when a launch that kept them was made to."""
    results, uncovered = {}, {}
    for arch in archs:
        compiled, kept_by = collections.Counter(), {}

        def least_compiled_first(kernel, config):
            return compiled[kernel, str(config)] * 1024 - config.kwargs["BLOCK_T"]

        for variant_id in variant_ids:
            variant = VARIANTS_BY_ID[variant_id]
            try:
                launches = _compile(variant, arch, None if variant.every_config else least_compiled_first)
                results[f"{variant_id}@{arch}"] = _problems(launches)
            except Exception as error:  # noqa: BLE001 - a compile error is this test's finding, reported per variant
                results[f"{variant_id}@{arch}"] = [_error(error)]
                continue
            for one in launches:
                for config, _ in one.compiled:
                    compiled[one.kernel, str(config)] += 1
                for config in one.kept:
                    kept_by.setdefault((one.kernel, str(config)), variant_id)
        missing = []
        for (kernel, config), variant_id in kept_by.items():
            if compiled[kernel, config]:
                continue
            wanted = (kernel, config)
            try:
                launches = _compile(VARIANTS_BY_ID[variant_id], arch,
                                    lambda name, candidate: 0 if (name, str(candidate)) == wanted else 1)
            except Exception as error:  # noqa: BLE001
                missing.append(f"{kernel} {config} (kept by {variant_id}): {_error(error)}")
                continue
            if wanted not in {(one.kernel, str(candidate)) for one in launches for candidate, _ in one.compiled}:
                missing.append(f"{kernel} {config} (kept by {variant_id}) did not compile when preferred")
            missing += _problems(launches)
        uncovered[str(arch)] = missing
    return dict(results=results, uncovered=uncovered)


def _in_workers(variant_ids: list, archs: list) -> dict:
    """compile_variants in fresh processes without TRITON_INTERPRET, the targets split between the CPUs."""
    workers = max(1, min(len(archs), os.cpu_count() or 1))
    groups = [list(archs[i::workers]) for i in range(workers)]
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as folder:
        workers = []
        for number, group in enumerate(group for group in groups if group):
            spec, out = os.path.join(folder, f"spec{number}.json"), os.path.join(folder, f"out{number}.json")
            with open(spec, "w") as handle:
                json.dump(dict(variants=variant_ids, archs=group), handle)
            process = subprocess.Popen([sys.executable, __file__, spec, out], env=environment,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            workers.append((process, out))
        merged = dict(results={}, uncovered={})
        for process, out in workers:
            log, _ = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"compile worker failed ({process.returncode}):\n{log[-4000:]}")
            with open(out) as handle:
                part = json.load(handle)
            merged["results"].update(part["results"])
            merged["uncovered"].update(part["uncovered"])
    return merged


@pytest.fixture(scope="module")
def compiled(request):
    """The compile results of every (variant, target) this run selected, compiled once for the module."""
    selected = {(item.callspec.params["variant"].id, item.callspec.params["arch"]) for item in request.session.items
                if getattr(item, "originalname", None) == "test_variant_compiles"}
    variant_ids = [variant.id for variant in VARIANTS if any((variant.id, arch) in selected for arch in ARCHS)]
    archs = [arch for arch in ARCHS if any((variant_id, arch) in selected for variant_id in variant_ids)]
    in_this_process = not triton_interpreter_enabled() and (os.cpu_count() or 1) == 1
    results = (compile_variants if in_this_process else _in_workers)(variant_ids, archs)
    results["complete"] = len(selected) == len(VARIANTS) * len(ARCHS)
    return results


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{arch}" for arch in ARCHS])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.id for variant in VARIANTS])
def test_variant_compiles(variant, arch, compiled):
    problems = compiled["results"][f"{variant.id}@{arch}"]
    assert not problems, f"{variant.id} for sm_{arch}: " + "; ".join(problems)


def test_every_kept_config_compiled(compiled):
    if not compiled["complete"]:
        pytest.skip("needs every test_variant_compiles of this module in the same run")
    for arch, problems in compiled["uncovered"].items():
        assert not problems, f"sm_{arch}: " + "; ".join(problems)


def test_variants_cover_every_value():
    """Both kernels meet every dtype, head_dim, size, layout and selection, and every flag set."""
    for kernel in ("forward", "backward"):
        variants = [variant for variant in VARIANTS if variant.kernel == kernel]
        for name, values in (("dtype", DTYPES), ("head_dim", HEAD_DIMS), ("size", SIZES), ("layout", LAYOUTS),
                             ("selection", SELECTIONS + ("none",))):
            missing = set(values) - {getattr(variant, name) for variant in variants}
            assert not missing, f"no {kernel} variant has {name} {missing}"
    forward_flags = {(v.scale, v.offset, v.save_selected, v.routed) for v in VARIANTS if v.kernel == "forward"}
    assert len(forward_flags) == 10  # (scale, offset) in 3 ways, save only with a scale, routed or not
    backward_flags = {(v.scale, v.need_grad_z, v.need_grad_scale, v.need_grad_offset, v.routed, v.selection == "all")
                      for v in VARIANTS if v.kernel == "backward"}
    assert len(backward_flags) == 32  # 8 flag sets that launch, x routed x every head selected or not
    assert len(VARIANTS_BY_ID) == len(VARIANTS), "variant ids must be unique"


def test_cross_compiler_restores_the_driver():
    from triton.runtime import driver

    before = getattr(driver, "_active", None)
    with cross_compile.CrossCompiler(90) as compiler:
        assert driver.active.get_current_target() == compiler.target
    assert getattr(driver, "_active", None) is before


if __name__ == "__main__":
    # A worker of _in_workers: python test_kernels_compile.py SPEC.json OUT.json
    with open(sys.argv[1]) as spec_file:
        spec = json.load(spec_file)
    with open(sys.argv[2], "w") as out_file:
        json.dump(compile_variants(spec["variants"], spec["archs"]), out_file)


# ----------------------------------------------------------------------------------------------
# Launch configurations (no compiling)
# ----------------------------------------------------------------------------------------------

def test_pruning_keeps_tiles_for_128_bit_accesses_and_no_spills():
    from lofit_fast.kernels import head_affine

    for kernel, configs in (("forward", head_affine._FORWARD_CONFIGS), ("backward", head_affine._BACKWARD_CONFIGS)):
        for block_d in (64, 128, 256):
            for tokens in (1, 16, 256, 16384):
                kept = head_affine.kept_configs(kernel, configs, block_d, tokens)
                assert kept and all(config in configs for config in kept)
                per_thread = {config.kwargs["BLOCK_T"] * block_d // (32 * config.num_warps) for config in kept}
                if tokens >= 64:  # room for every tile height: only the per-thread bounds prune
                    assert min(per_thread) >= head_affine._MIN_PER_THREAD
                    assert max(per_thread) <= head_affine._MAX_PER_THREAD[kernel]
                assert all(config.num_stages == 1 for config in kept)  # no loop feeds a tl.dot: stages change nothing
                fixed = head_affine.fixed_config(kept, block_d)
                assert fixed in kept and fixed is head_affine.fixed_config(list(reversed(kept)), block_d)


class _Recorder:
    """Stands in for a Triton kernel: records the keyword arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


class _Autotuner(_Recorder):
    """Stands in for triton.autotune's Autotuner: its configs, and the kernel it tunes as `fn`."""

    def __init__(self, configs):
        super().__init__()
        self.configs, self.fn = configs, _Recorder()


@pytest.mark.parametrize("switch", ["environment", "torch"])
def test_deterministic_mode_launches_the_fixed_config(switch, monkeypatch):
    """Deterministic mode (LOFIT_FAST_DETERMINISTIC=1, or torch.use_deterministic_algorithms) skips the autotuner
    and launches the fixed config, which does not depend on timings: the same sums in the same order every run."""
    import torch

    from lofit_fast.kernels import head_affine

    kernels = head_affine.HeadAffineKernels(interpreted=True)
    kernels.interpreted = False  # launch as the compiled kernels are launched, into the stand-ins
    autotuner = _Autotuner(head_affine._BACKWARD_CONFIGS)
    kernels.forward_kernel = kernels.backward_kernel = autotuner
    constexprs = dict(BLOCK_D=128, HEAD_DIM=128)
    kernels._launch("backward", lambda meta: (1, 1), (), 256, **constexprs)
    assert len(autotuner.launches) == 1 and autotuner.fn.launches == []
    if switch == "environment":
        monkeypatch.setenv("LOFIT_FAST_DETERMINISTIC", "1")
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    kernels._launch("backward", lambda meta: (1, 1), (), 256, **constexprs)
    assert len(autotuner.launches) == 1 and len(autotuner.fn.launches) == 1
    launched = autotuner.fn.launches[0]
    expected = head_affine.fixed_config(head_affine.kept_configs("backward", autotuner.configs, 128, 256), 128)
    assert {name: launched[name] for name in expected.all_kwargs()} == expected.all_kwargs()
