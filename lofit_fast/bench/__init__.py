"""The benchmarks of lofit_fast, one module each; every one prints a table, writes JSON to `benchmarks/results/`
and names the device. Methodology: benchmarks/README.md; numbers measured so far: README.md, "Benchmarks".

- `kernels` (`lofit bench`): the head transform alone (eager hook, torch, torch.compile, Triton), forward and
  backward, GB/s against a copy; `--cpu-target` is the CPU acceptance run.
- `e2e` (`lofit bench --e2e`): training steps on bitsandbytes NF4 / int8 Llama-2 shapes against the frozen
  floor, the paper's hook and QLoRA: memory, speed, the largest batch under a 24 GB cap.
- `multi`: one batch mixing many adapters against the adapters served one after another.
- `static` (`lofit bench --static`): the kernels compiled for a GPU target on any machine, read, and a bandwidth
  prediction.
- `common`: what they share: timing, device names, synchronisation, peak memory, JSON, heads, progress.

Run one with `lofit bench [--e2e | --static] ...` or `python benchmarks/bench_<name>.py ...` (the scripts are
thin wrappers of these modules' `main`); `--help` lists each one's options.
"""
