"""Run saved models and PEFT adapters the way a user without lofit_fast does: stock transformers and peft only.

    python fresh_process.py JOBS.json OUT.pt

JOBS.json: {"input_ids": [[...]], "max_new_tokens": n,
            "cases": {name: {"model": directory, "adapter": PEFT adapter directory or null,
                             "quantization": null | "nf4-fp32"}}}
OUT.pt: {name: {"logits": (batch, tokens, vocab) fp32, "tokens": generated ids, "step_logits": (steps, batch,
vocab)}}, and "lofit_fast_imported": whether anything imported lofit_fast (it must not).

bitsandbytes' AVX512-BF16 CPU kernel is switched off on every 4-bit layer, so the run computes the same on any
CPU as the library's (trainable) adapters do.
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANTIZATIONS = {"nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32)}


def load_base(directory, quantization):
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(**QUANTIZATIONS[quantization]), device_map="cpu")
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def run_in_fresh_process(jobs: dict, directory) -> dict:
    """Run `jobs` (see the module doc) in a new Python process; its results. `directory`: for the job files."""
    import os
    import subprocess

    jobs_path, out_path = os.path.join(directory, "jobs.json"), os.path.join(directory, "results.pt")
    with open(jobs_path, "w") as file:
        json.dump(jobs, file)
    result = subprocess.run([sys.executable, __file__, jobs_path, out_path], capture_output=True, text=True,
                            cwd=directory, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path)


def run_and_generate(model, ids, max_new_tokens: int) -> tuple:
    """(logits of `ids`, greedy tokens, the logits of each generated step), all fp32."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    return logits, out.sequences, torch.stack(out.logits).float()


def main(jobs_path, out_path):
    torch.set_num_threads(1)
    with open(jobs_path) as file:
        jobs = json.load(file)
    ids = torch.tensor(jobs["input_ids"])
    results = {}
    for name, case in jobs["cases"].items():
        model = load_base(case["model"], case["quantization"])
        if case["adapter"] is not None:
            model = PeftModel.from_pretrained(model, case["adapter"])
        model.eval()
        logits, tokens, step_logits = run_and_generate(model, ids, jobs["max_new_tokens"])
        results[name] = {"logits": logits, "tokens": tokens, "step_logits": step_logits}
    results["lofit_fast_imported"] = any(module.split(".")[0] == "lofit_fast" for module in sys.modules)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
