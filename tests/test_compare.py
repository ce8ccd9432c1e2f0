"""`lofit compare`: the method grid, the verdicts, a quick comparison on the demo's base (table, parameter counts
against PEFT's own, compare.json / compare.png, the transfer matrix), worker processes, and the comparison on a
user's model through the command line."""

import contextlib
import io
import json
from dataclasses import replace

import pytest
import torch
from test_demo import png_size
from transformers import AutoModelForCausalLM, AutoTokenizer

from lofit_fast import compare, demo
from lofit_fast.cli import main

from bnb_cpu import CPU_KINDS, cpu_kind, is_repacked
from helpers import QUANTIZABLE_CONFIG, save_tiny_model_and_tokenizer
from test_data import write_json_lines

peft = pytest.importorskip("peft")

# The demo's QUICK comparison on a base pretrained for 20 steps (about a second): a smoke run of every row.
TINY = replace(compare.QUICK, demo=replace(demo.QUICK, pretrain_steps=20))


# ----------------------------------------------------------------------------------------------
# The grid and the verdicts
# ----------------------------------------------------------------------------------------------

def test_method_grid_crosses_families_with_head_counts_and_ranks():
    methods = compare.method_grid(compare.FAMILIES, [1, 3], [2, 8])
    assert [method.label for method in methods] == [
        "LoFiT top-1", "LoFiT top-3", "random 1 heads", "random 3 heads", "probe top-1", "probe top-3",
        "LoFiT, all heads", "LoRA o_proj r=2", "LoRA o_proj r=8", "LoRA q,v r=2", "LoRA q,v r=8", "IA3"]
    with pytest.raises(ValueError, match="unknown method families lora.*choose from"):
        compare.method_grid(["lofit", "lora"], [1], [1])


def row(method: str, family: str, params: int, accuracies: list, k=None) -> dict:
    records = [{"trainable_params": params, "all_params": 1000, "accuracy": accuracy, "seed": seed}
               for seed, accuracy in enumerate(accuracies)]
    summary = compare.summarize(compare.Method(family, k=k, rank=1), records)
    return {**summary, "method": method}


def test_summary_gives_mean_spread_and_the_one_parameter_count():
    summary = row("LoFiT top-3", "lofit", 24, [0.5, 0.7, 0.9], k=3)
    assert summary["accuracy_mean"] == pytest.approx(0.7)
    assert summary["accuracy_std"] == pytest.approx(0.2)
    assert (summary["accuracy_min"], summary["accuracy_max"]) == (0.5, 0.9)
    assert summary["trainable_percent"] == pytest.approx(2.4)
    records = [{"trainable_params": 24, "all_params": 1000, "accuracy": 0.5, "seed": 0},
               {"trainable_params": 25, "all_params": 1000, "accuracy": 0.5, "seed": 1}]
    with pytest.raises(RuntimeError, match="parameter counts differ"):
        compare.summarize(compare.Method("lofit", k=3), records)


def test_paired_comparison_goes_seed_by_seed():
    # Ahead in every seed beats, however widely the other spreads over seeds.
    assert compare.paired_comparison([0.99, 0.98, 0.99], [0.70, 0.97, 0.80])["word"] == "beats"
    assert compare.paired_comparison([0.70, 0.97, 0.80], [0.99, 0.98, 0.99])["word"] == "loses to"
    # 10 of 2,000 prompts apart (the margin, up to float rounding) is level.
    assert compare.paired_comparison([0.9755], [0.9805])["word"] == "ties with"
    assert compare.paired_comparison([0.99, 0.80], [0.80, 0.99])["word"] == "is mixed against"
    result = compare.paired_comparison([1.0, 0.5, 0.75], [0.5, 0.5, 0.75])
    assert (result["ahead"], result["behind"], result["seeds"]) == (1, 0, 3)
    assert result["difference"] == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="same seeds"):
        compare.paired_comparison([0.5, 0.6], [0.5])


def test_verdicts_say_who_wins_ties_and_loses():
    rows = [row("LoFiT top-3", "lofit", 24, [0.99, 0.98, 0.99], k=3),
            row("random 3 heads", "random", 24, [0.70, 0.90, 0.80], k=3),
            row("probe top-3", "probe", 24, [0.99, 0.982, 0.988], k=3),
            row("LoRA o_proj r=1", "lora-o_proj", 1536, [1.0, 1.0, 1.0])]
    sentences = compare.verdicts(rows)
    assert any(s.startswith("LoFiT top-3 (0.987, 24 params) beats random 3 heads") and "ahead in 3" in s
               for s in sentences)
    assert any(s.startswith("LoFiT top-3 (0.987, 24 params) ties with probe top-3") for s in sentences)
    # LoRA is ahead of LoFiT in every seed, beyond the margin: the output must say that LoRA wins.
    assert any(s.startswith("Best PEFT row: LoRA o_proj r=1") and "64x the parameters: LoRA/IA3 WINS" in s
               for s in sentences)
    assert any(s.startswith("No LoFiT row is level with the best PEFT row") for s in sentences)
    assert any(s.startswith("No PEFT row is as small as LoFiT") for s in sentences)
    rows[-1] = row("LoRA o_proj r=1", "lora-o_proj", 1536, [0.99, 0.98, 0.99])
    sentences = compare.verdicts(rows)
    assert any("a tie" in s for s in sentences)
    assert any(s.startswith("The smallest LoFiT row level with or above it, LoFiT top-3") and "64x fewer" in s
               for s in sentences)


# ----------------------------------------------------------------------------------------------
# A quick comparison on the demo's base
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(results, printed output, output directory, the base model) of the TINY comparison, in this process."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOFIT_CACHE", str(root / "cache"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            results = compare.run_demo_comparison(str(root / "out"), workers=1, comparison=TINY)
        base = demo.load_or_pretrain_base(TINY.demo, demo.build_tokenizer(TINY.demo), log=lambda message: None)[0]
    return results, printed.getvalue(), root / "out", base


def test_quick_comparison_has_every_row_over_every_seed(quick):
    results, printed, _, _ = quick
    settings = TINY.demo
    total_heads = settings.num_layers * settings.num_heads
    assert results["settings"]["head_counts"] == [1, 2]  # 12.5% and 25% of 8 heads
    expected = compare.method_grid(compare.FAMILIES, [1, 2], TINY.lora_ranks)
    assert [r["method"] for r in results["rows"]] == [method.label for method in expected]
    for summary in results["rows"]:
        assert summary["seeds"] == list(TINY.seeds)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in summary["accuracies"])
        assert summary["accuracy_mean"] == pytest.approx(sum(summary["accuracies"]) / len(TINY.seeds))
        # The printed table carries the same numbers.
        assert f"{summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}" in printed
        if summary["family"] in ("lofit", "random", "probe"):
            assert summary["trainable_params"] == summary["k"] * settings.head_dim
        elif summary["family"] == "lofit-all":
            assert summary["trainable_params"] == total_heads * settings.head_dim
    assert results["verdicts"] and all(sentence in printed for sentence in results["verdicts"])
    # Each seed's random heads are its own draw.
    random_heads = {tuple(map(tuple, run["trained"])) for run in results["runs"]
                    if run["method"] == "random 2 heads" and run["task"] == demo.NEW_WORD_MEANS}
    assert len(random_heads) == len(TINY.seeds)


@pytest.mark.parametrize("family, expected_config", [
    ("lora-o_proj", lambda: peft.LoraConfig(r=1, lora_alpha=2, target_modules=["o_proj"])),
    ("lora-qv", lambda: peft.LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"])),
    ("ia3", lambda: peft.IA3Config(task_type="CAUSAL_LM")),
])
def test_peft_rows_count_parameters_as_peft_does(quick, family, expected_config):
    results, _, _, base = quick
    summary = next(r for r in results["rows"] if r["family"] == family)
    peft_model = peft.get_peft_model(demo.new_model(TINY.demo), expected_config())
    assert (summary["trainable_params"], summary["all_params"]) == peft_model.get_nb_trainable_parameters()
    lofit_row = next(r for r in results["rows"] if r["family"] == "lofit")
    assert lofit_row["all_params"] == sum(p.numel() for p in base.parameters()) + lofit_row["trainable_params"]


def test_quick_comparison_writes_json_and_png(quick):
    results, _, out, _ = quick
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(results))
    width, height = png_size(out / "compare.png")
    assert width > 400 and height > 300
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.png"]  # no temporary files left
    assert results["machine"]["cpu"] and results["machine"]["date"]
    assert results["timings_s"]["total"] > 0 and results["base_model"]["loaded_from_cache"] is False


def test_transfer_matrix_covers_every_pair_of_tasks(quick):
    results, printed, _, _ = quick
    transfer = results["transfer"]
    tasks = list(TINY.transfer_skills)
    assert transfer["tasks"] == tasks and transfer["k"] == 2
    assert len(transfer["accuracy"]) == len(tasks) and all(len(r) == len(tasks) for r in transfer["accuracy"])
    assert len(transfer["random"]) == len(transfer["base"]) == len(tasks)
    assert transfer["base"][0] == results["base_accuracy"]
    # The diagonal cell of the demo's task is the table's own run (seed 0), run once.
    own = next(run for run in results["runs"] if run["method"] == "LoFiT top-2" and run["seed"] == 0
               and run["task"] == run["heads_from"] == demo.NEW_WORD_MEANS)
    assert transfer["accuracy"][0][0] == own["accuracy"]
    crossed = [run for run in results["runs"] if run["task"] != run["heads_from"]]
    assert {(run["heads_from"], run["task"]) for run in crossed} == {("first", "last"), ("last", "first")}
    # Heads chosen on another task are that task's step-1 ranking's top heads.
    first_ranking = next(r for r in results["rankings"] if r["task"] == "first" and r["localizer"] == "lofit")
    assert next(run for run in crossed if run["heads_from"] == "first")["trained"] == \
        [entry[:2] for entry in first_ranking["ranking"][:2]]
    assert "task specificity" in printed and all(sentence in printed for sentence in transfer["verdicts"])


def test_a_single_transfer_skill_leaves_the_transfer_test_out(quick, tmp_path, monkeypatch):
    _, _, out, _ = quick
    monkeypatch.setenv("LOFIT_CACHE", str(out.parent / "cache"))  # the quick run's cached base
    monkeypatch.setattr(compare, "FAMILIES", ("lofit",))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = compare.run_demo_comparison(str(tmp_path), comparison=replace(
            TINY, seeds=(0,), head_fractions=(0.25,), transfer_skills=("last",)))
    assert results["transfer"] is None and "task specificity" not in printed.getvalue()
    assert [(run["method"], run["task"]) for run in results["runs"]] == [("LoFiT top-2", "last")]


def test_worker_processes_give_the_results_of_this_process(quick, tmp_path, monkeypatch):
    """A ranking and a run done by two spawned workers equal the same jobs done here (and the quick run's)."""
    results, _, _, _ = quick
    monkeypatch.setenv("LOFIT_CACHE", str(tmp_path / "cache"))
    with demo.cpu_session("lofit_compare_test_") as scratch:
        bench = compare.DemoBench(TINY, scratch, log=lambda message: None)
        run = compare.Run(compare.Method("lofit", k=1), "last", "last", 1)
        here = compare.rank_heads(bench, "lofit", "last", 1)
        with compare._worker_pool(TINY, 2, scratch) as pool:
            (there,) = compare._run_jobs([("lofit", "last", 1)], bench, pool, {}, log=lambda message: None)
            (record,) = compare._run_jobs([run], bench, pool, {run.ranking_key(): there}, log=lambda message: None)
    assert there.ranking == here.ranking
    quick_record = next(r for r in results["runs"] if r["method"] == "LoFiT top-1" and r["seed"] == 1
                        and r["task"] == "last")
    assert record["accuracy"] == quick_record["accuracy"] and record["trained"] == quick_record["trained"]


# ----------------------------------------------------------------------------------------------
# On a user's model
# ----------------------------------------------------------------------------------------------

QUESTIONS = [("What is the capital of France?", " Rome"), ("Can pigs fly?", " No"),
             ("Who is the mother of Bob?", " Anna"), ("Is Rome in France?", " No")]


def write_sft(path, pairs):
    return write_json_lines(path, [{"prompt": f"Q: {q} A:", "completion": a} for q, a in pairs])


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    save_tiny_model_and_tokenizer(root / "model")
    return root, write_sft(root / "train.jsonl", QUESTIONS * 2), write_sft(root / "test.jsonl", QUESTIONS)


def test_compare_on_a_user_model_through_the_command_line(user_files, capsys):
    root, train, test = user_files
    out = root / "out"
    code = main(["compare", "--model", str(root / "model"), "--task", "sft", "--data", str(train),
                 "--eval-data", str(test), "--methods", "lofit,random,probe,lora-o_proj,lora-qv", "--k", "2",
                 "--lora-ranks", "1,2", "--seeds", "0,1", "--epochs", "1", "--batch-size", "4",
                 "--backend", "torch", "--max-new-tokens", "3", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "compare.json").read_text())
    png_size(out / "compare.png")
    assert [r["method"] for r in results["rows"]] == [
        "LoFiT top-2", "random 2 heads", "probe top-2", "LoRA o_proj r=1", "LoRA o_proj r=2", "LoRA q,v r=1",
        "LoRA q,v r=2"]
    head_dim = 12  # tests/helpers.py's tiny model: 3 layers x 6 heads of 12
    for summary in results["rows"]:
        assert summary["seeds"] == [0, 1] and f"{summary['accuracy_mean']:.3f}" in printed
        if summary["family"] in ("lofit", "random", "probe"):
            assert summary["trainable_params"] == 2 * head_dim
    for summary in results["rows"][3:]:
        targets = ["o_proj"] if summary["family"] == "lora-o_proj" else ["q_proj", "v_proj"]
        model = AutoModelForCausalLM.from_pretrained(root / "model")
        expected = peft.get_peft_model(model, peft.LoraConfig(r=summary["rank"], target_modules=targets))
        assert (summary["trainable_params"], summary["all_params"]) == expected.get_nb_trainable_parameters()
    # Equal counts would not tell o_proj from q_proj (both 48 <-> 72 here): the records name what was adapted.
    for run in results["runs"]:
        if run["family"] == "lora-o_proj":
            assert run["trained"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(3)]
        elif run["family"] == "lora-qv":
            assert run["trained"] == ["q_proj", "v_proj"]
    assert results["task"] == {"name": "sft", "train_examples": 8, "eval_examples": 4}
    assert results["settings"]["tune"]["num_train_epochs"] == 1 and results["transfer"] is None


def test_compare_on_model_leaves_the_model_as_it_was(user_files, tmp_path):
    root, train, test = user_files
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    results = quiet_compare_on_model(model, AutoTokenizer.from_pretrained(root / "model"), train, test, tmp_path,
                                     ("lofit-all", "lora-o_proj", "ia3"))
    assert [r["method"] for r in results["rows"]] == ["LoFiT, all heads", "LoRA o_proj r=1", "IA3"]
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name].detach(), value) and after[name].requires_grad == requires_grad, name


def quiet_compare_on_model(model, tokenizer, train, test, output_dir, families, **overrides):
    """compare_on_model on the SFT files, one epoch of batch 4, seed 0, K = 1, nothing printed."""
    from lofit_fast.data import SFTCollator, load_task, tokenize_sft
    from lofit_fast.training import paper_settings

    rows = [tokenize_sft(example, tokenizer, 64) for example in load_task("sft", str(train))]
    settings = paper_settings("sft", model=model)
    quick = dict(num_train_epochs=1, per_device_train_batch_size=4)
    arguments = dict(task="sft", select_settings=replace(settings["select"], **quick),
                     tune_settings=replace(settings["tune"], **quick), head_counts=[1], seeds=(0,),
                     families=families, lora_ranks=(1,), lora_lr=1e-2, output_dir=str(output_dir), backend="torch",
                     max_new_tokens=2, training_args={"disable_tqdm": True})
    with contextlib.redirect_stdout(io.StringIO()):
        return compare.compare_on_model(model, tokenizer, rows, SFTCollator(tokenizer.pad_token_id),
                                        load_task("sft", str(test)), **{**arguments, **overrides})


def test_a_row_peft_cannot_build_fails_before_any_training(user_files, tmp_path, monkeypatch):
    root, train, test = user_files
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    model.config.model_type = "llama_of_my_own"  # PEFT knows no default IA3 targets for it; lofit_fast is told
    from lofit_fast import patch

    monkeypatch.setitem(patch.ARCHITECTURES, "llama_of_my_own", patch.ARCHITECTURES["llama"])
    trained = []
    monkeypatch.setattr(compare, "train_and_score", lambda *args: trained.append(args))
    with pytest.raises(ValueError, match="no default IA3 targets for model_type 'llama_of_my_own'.*leave ia3 out"):
        quiet_compare_on_model(model, AutoTokenizer.from_pretrained(root / "model"), train, test, tmp_path,
                               ("lofit", "ia3"))
    assert trained == []


def test_finished_runs_are_kept_when_a_later_run_fails(user_files, tmp_path, monkeypatch):
    root, train, test = user_files

    def out_of_memory(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(compare, "_peft_run", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        quiet_compare_on_model(AutoModelForCausalLM.from_pretrained(root / "model"),
                               AutoTokenizer.from_pretrained(root / "model"), train, test, tmp_path,
                               ("lofit-all", "lora-o_proj"))
    partial = json.loads((tmp_path / compare.PARTIAL_NAME).read_text())
    assert partial["finished_runs"] == 1 and partial["of"] == 2
    assert [run["method"] for run in partial["runs"]] == ["LoFiT, all heads"]
    assert not (tmp_path / "compare.json").exists()


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_compare_on_a_4bit_model_on_either_kind_of_cpu(user_files, tmp_path, kind):
    """Evaluations between the runs must not leave the 4-bit layers repacked for bitsandbytes' CPU inference
    kernel (no backward), or the next run could not train through them."""
    from transformers import BitsAndBytesConfig

    root, train, test = user_files
    save_tiny_model_and_tokenizer(tmp_path / "model", **QUANTIZABLE_CONFIG)
    with cpu_kind(kind):
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "model", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            dtype=torch.float32, device_map={"": "cpu"})
        results = quiet_compare_on_model(model, AutoTokenizer.from_pretrained(tmp_path / "model"), train, test,
                                         tmp_path / "out", ("lofit", "lora-o_proj"))
    assert [r["method"] for r in results["rows"]] == ["LoFiT top-1", "LoRA o_proj r=1"]
    assert not (tmp_path / "out" / compare.PARTIAL_NAME).exists()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(is_repacked(layer) or layer.support_avx512bf16_for_cpu for layer in layers)


@pytest.mark.parametrize("arguments, message", [
    (["--task", "sft"], "--task is an option of a comparison on your model"),
    (["--model", "m", "--task", "sft", "--data", "d.jsonl"], "needs --eval-data"),
    (["--model", "m", "--task", "dpo", "--data", "d.jsonl", "--eval-data", "e.jsonl"], "SFT task"),
    (["--model", "m", "--task", "sft", "--data", "d", "--eval-data", "e", "--workers", "2"], "demo's comparison"),
])
def test_compare_refuses_options_that_do_not_fit(arguments, message, capsys):
    assert main(["compare", *arguments]) == 2
    assert message in capsys.readouterr().err
