"""The embedded demo on a small budget: its task, its base-model cache, a quick end-to-end run, and the
head-score heatmap it draws."""

import json
import random
import struct
from dataclasses import replace

import pytest
import torch

from lofit_fast import demo
from lofit_fast.heatmap import plot_head_scores
from lofit_fast.training import HeadRanking

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Smaller than QUICK so the cache tests pretrain in about a second.
TINY = replace(demo.QUICK, pretrain_steps=20)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The demo's cache in a fresh temporary directory."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("LOFIT_CACHE", str(directory))
    return directory


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("instruction", [*demo.INSTRUCTION_POSITIONS, demo.NEW_WORD])
def test_every_answer_is_the_item_the_instruction_names(instruction):
    settings = demo.FULL
    examples = demo.make_examples(instruction, 200, random.Random(0), settings)
    expected_positions = {"first": 0, "second": 1, "penultimate": -2, "last": -1}
    skill = next((name for name, (_, words) in demo.SKILLS.items() if instruction in words), demo.NEW_WORD_MEANS)
    position = expected_positions[skill]
    for example in examples:
        word, *items, mark = example.prompt.split()
        assert word == instruction and mark == demo.ANSWER_MARK
        assert len(items) == settings.list_length == len(set(items))  # distinct: the answer is unambiguous
        assert example.answer == items[position]


@pytest.mark.parametrize("means", list(demo.SKILLS))
def test_adaptation_data_teaches_the_new_word_a_skill(means):
    settings = replace(demo.QUICK, train_examples=100, eval_examples=100)
    train, held_out = demo.adaptation_data(settings, seed=3, means=means)
    position = demo.SKILLS[means][0]
    for example in train + held_out:
        word, *items, _ = example.prompt.split()
        assert word == demo.NEW_WORD and example.answer == items[position]
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    # The held-out prompts are the same for every seed and every skill; the training prompts follow the seed.
    other_train, other_held_out = demo.adaptation_data(settings, seed=4, means="first")
    assert [e.prompt for e in other_held_out] == [e.prompt for e in held_out]
    assert [e.prompt for e in other_train] != [e.prompt for e in train]


def test_the_new_word_is_no_pretraining_instruction():
    assert demo.NEW_WORD not in demo.INSTRUCTION_POSITIONS
    assert demo.NEW_WORD in demo.vocabulary(demo.QUICK)


def test_training_prompts_can_exclude_the_held_out_ones():
    settings = demo.QUICK
    held_out = {e.prompt for e in demo.make_examples(demo.NEW_WORD, 300, random.Random(1), settings)}
    train = demo.make_examples(demo.NEW_WORD, 300, random.Random(2), settings, exclude=frozenset(held_out))
    assert not held_out & {e.prompt for e in train}


def test_tokenizer_gives_one_token_per_word_and_rows_mask_the_prompt():
    settings = demo.QUICK
    tokenizer = demo.build_tokenizer(settings)
    examples = demo.make_examples("first", 3, random.Random(0), settings)
    rows = demo.encode(examples, tokenizer)
    for example, row in zip(examples, rows):
        words = example.prompt.split() + [example.answer]
        assert tokenizer.convert_ids_to_tokens(row["input_ids"].tolist()) == words
        assert row["labels"][:-1].eq(-100).all() and row["labels"][-1] == row["input_ids"][-1]
    batch = demo.collate(rows)
    assert batch["input_ids"].shape == (3, settings.list_length + 3)


def test_pretraining_never_shows_the_new_word():
    """The new word's embedding must still be its initial value after pretraining."""
    tokenizer = demo.build_tokenizer(TINY)
    new_id = tokenizer.convert_tokens_to_ids(demo.NEW_WORD)
    initial = demo.new_model(TINY).get_input_embeddings().weight[new_id].clone()
    trained = demo.pretrain(TINY, tokenizer, log=lambda message: None)
    assert torch.equal(trained.get_input_embeddings().weight[new_id], initial)


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------

def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOFIT_CACHE", str(tmp_path / "explicit"))
    assert demo.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("LOFIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == str(tmp_path / "xdg" / "lofit_fast")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == str(tmp_path / "home" / ".cache" / "lofit_fast")


def test_cache_key_depends_on_the_base_settings_only(cache):
    assert demo.base_cache_path(demo.FULL) != demo.base_cache_path(demo.QUICK)
    assert demo.base_cache_path(TINY) != demo.base_cache_path(replace(TINY, pretrain_steps=21))
    # Adaptation settings do not change the base, so they share its cache.
    assert demo.base_cache_path(TINY) == demo.base_cache_path(replace(TINY, tune_lr=1.0, k=1))


def test_second_call_loads_the_cache_without_pretraining(cache, monkeypatch):
    tokenizer = demo.build_tokenizer(TINY)
    first, path, cached = demo.load_or_pretrain_base(TINY, tokenizer, log=lambda message: None)
    assert not cached and path.startswith(str(cache))
    assert [p.name for p in cache.iterdir()] == [path.rsplit("/", 1)[-1]]  # no temporary files left

    def must_not_pretrain(*args, **kwargs):
        raise AssertionError("pretrained again although the cache was there")

    monkeypatch.setattr(demo, "pretrain", must_not_pretrain)
    second, _, cached = demo.load_or_pretrain_base(TINY, tokenizer, log=lambda message: None)
    assert cached
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupt_cache_file_is_rebuilt(cache):
    tokenizer = demo.build_tokenizer(TINY)
    path = demo.base_cache_path(TINY)
    cache.mkdir(parents=True)
    with open(path, "wb") as file:
        file.write(b"not a safetensors file")
    messages = []
    model, _, cached = demo.load_or_pretrain_base(TINY, tokenizer, log=messages.append)
    assert not cached and any("unreadable" in message for message in messages)
    _, _, cached = demo.load_or_pretrain_base(TINY, tokenizer, log=messages.append)
    assert cached


# ----------------------------------------------------------------------------------------------
# A quick end-to-end run
# ----------------------------------------------------------------------------------------------

def test_quick_demo_writes_a_consistent_report(cache, tmp_path, capsys):
    out = tmp_path / "demo"
    results = demo.run_demo(str(out), quick=True, seed=0)
    printed = capsys.readouterr().out

    for name in ("ranking.json", "heads.png", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    png_size(out / "heads.png")
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    ranking = HeadRanking.load(out / "ranking.json")
    settings = demo.QUICK
    k = settings.k
    assert len(ranking.ranking) == settings.num_layers * settings.num_heads
    assert results["lofit_heads"] == [list(head) for head in ranking.top(k)]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["heads"] == results["lofit_heads"]

    runs = [run["accuracy"] for run in results["random_runs"]]
    assert len(runs) == settings.random_runs
    assert len({tuple(map(tuple, run["heads"])) for run in results["random_runs"]}) == len(runs)
    rows = results["table"]
    assert [row["heads"] for row in rows] == [0, k, k, k]
    assert rows[2]["accuracy"] == pytest.approx(sum(runs) / len(runs))
    assert rows[3]["accuracy"] == max(runs)
    assert results["lofit_beats_random_mean"] == (rows[1]["accuracy"] > rows[2]["accuracy"])
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)

    assert results["reload"]["matches"] and results["reload"]["accuracy"] == rows[1]["accuracy"]
    assert results["timings_s"]["total"] > 0
    # The printed table carries the same numbers, and Trainer's own logs stay out of it.
    for row in rows:
        assert f"{row['accuracy']:.3f}" in printed
    assert "matches" in printed and "train_runtime" not in printed
    assert results["base_model"]["loaded_from_cache"] is False


def test_demo_restores_torch_threads(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "QUICK", replace(TINY, random_runs=1, select_steps=4, tune_steps=4,
                                               eval_examples=40, train_examples=16))
    before = torch.get_num_threads()
    results = demo.run_demo(str(tmp_path / "out"), quick=True, seed=1)
    assert torch.get_num_threads() == before
    assert results["seed"] == 1 and results["random_runs"][0]["heads_seed"] == 1


# ----------------------------------------------------------------------------------------------
# The heatmap
# ----------------------------------------------------------------------------------------------

def scored_ranking(num_layers=3, num_heads=5) -> HeadRanking:
    scores = {(layer, head): (layer * num_heads + head) / 10
              for layer in range(num_layers) for head in range(num_heads)}
    order = sorted(scores, key=lambda head: -scores[head])
    return HeadRanking([(*head, scores[head]) for head in order], num_layers, num_heads)


def test_heatmap_is_a_png(tmp_path):
    path = tmp_path / "heads.png"
    plot_head_scores(scored_ranking(), path, selected_k=3)
    width, height = png_size(path)
    assert width > 100 and height > 100
    assert [p.name for p in tmp_path.iterdir()] == ["heads.png"]  # the temporary file was renamed


def test_heatmap_of_a_random_ranking_and_a_fraction_k(tmp_path):
    ranking = HeadRanking([(layer, head, None) for layer in range(2) for head in range(4)], 2, 4,
                          localizer="random")
    plot_head_scores(ranking, tmp_path / "random.png", selected_k=0.25)
    plot_head_scores(ranking, tmp_path / "none.png")
    plot_head_scores(scored_ranking(), tmp_path / "fraction.png", selected_k=0.2)
    for name in ("random.png", "none.png", "fraction.png"):
        png_size(tmp_path / name)


def test_heatmap_rejects_a_bad_k_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        plot_head_scores(scored_ranking(), tmp_path / "bad.png", selected_k=999)
    assert not list(tmp_path.iterdir())
