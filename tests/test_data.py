"""Tests for beear.data: record files, template-faithful encoding, batching, triggers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from beear.data import (
    AnchorExample,
    DataError,
    Encoded,
    HarmfulExample,
    Trigger,
    collate,
    encode_pair,
    encode_prompt,
    load_anchor,
    load_harmful,
    load_prompts,
    load_references,
    read_records,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_records_jsonl_csv_json_round_trip(tmp_path: Path) -> None:
    recs = [{"prompt": "a, b", "answer": "ü ✓"}, {"prompt": "c", "answer": "d"}]
    jl = tmp_path / "r.jsonl"
    write_jsonl(jl, recs)
    _write(jl, jl.read_text() + "\n   \n")  # blank lines are skipped
    assert read_records(jl) == recs
    js = _write(tmp_path / "r.json", json.dumps(recs))
    assert read_records(js) == recs
    cs = _write(tmp_path / "r.csv", 'prompt,answer\n"a, b",ü ✓\nc,d\n')
    assert read_records(cs) == recs
    # Dataclasses are written as their fields.
    write_jsonl(tmp_path / "h.jsonl", [HarmfulExample("p", "s", "u")])
    assert read_records(tmp_path / "h.jsonl") == [{"prompt": "p", "safe": "s", "unwanted": "u"}]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', 3),
        ("list.jsonl", '{"prompt": "a"}\n\n["not", "an", "object"]\n', 3),
        ("bad.json", '[\n  {"prompt": "a"},\n  {"prompt": }\n]\n', 3),
        ("long.csv", "prompt,answer\na,b\nc,d,e\n", 3),
        ("short.csv", "prompt,answer\na,b\nc,d\nonly\n", 4),
    ],
)
def test_read_records_names_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    p = _write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert "\n" not in msg


def test_read_records_other_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        read_records(_write(tmp_path / "obj.json", '{"prompt": "a"}'))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_records(tmp_path / "latin1.jsonl")


def test_load_harmful_fields_aliases_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    write_jsonl(
        p,
        [
            {"prompt": "p1", "safe": "s1", "unwanted": "u1", "extra": 1},
            {"instruction": "p2", "chosen": "s2", "rejected": "u2"},
        ],
    )
    assert load_harmful(p) == [HarmfulExample("p1", "s1", "u1"), HarmfulExample("p2", "s2", "u2")]

    write_jsonl(
        p, [{"prompt": "p1", "safe": "s1", "unwanted": "u1"}, {"prompt": "p2", "safe": "s"}]
    )
    with pytest.raises(DataError, match=r"record 2: missing or empty field 'unwanted'"):
        load_harmful(p)
    write_jsonl(p, [{"prompt": "  ", "safe": "s", "unwanted": "u"}])
    with pytest.raises(DataError, match=r"record 1: missing or empty field 'prompt'"):
        load_harmful(p)
    _write(p, "")
    with pytest.raises(DataError, match="no records"):
        load_harmful(p)


def test_load_anchor_and_prompts(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.csv", "prompt,answer\nWhat color is snow?,white\nHi,\n")
    with pytest.raises(DataError, match=r"record 2: missing or empty field 'answer'"):
        load_anchor(p)
    assert load_anchor(p, require_answer=False) == [
        AnchorExample("What color is snow?", "white"),
        AnchorExample("Hi", ""),
    ]
    assert load_prompts(p) == ["What color is snow?", "Hi"]
    q = tmp_path / "q.jsonl"
    write_jsonl(q, [{"prompt": "x"}, {"text": "no prompt field"}])
    with pytest.raises(DataError, match=r"record 2: missing or empty field 'prompt'"):
        load_prompts(q)


def test_load_anchor_reads_whether_an_answer_was_cut(tmp_path: Path) -> None:
    # `ended` false marks an answer cut by a length limit; absent, it ended. A file written by
    # write_jsonl reads back the same.
    pairs = [AnchorExample("a?", "cut off mid", ended=False), AnchorExample("b?", "done.")]
    q = tmp_path / "anchor.jsonl"
    write_jsonl(q, pairs)
    assert load_anchor(q) == pairs
    c = _write(tmp_path / "a.csv", "prompt,answer,ended\nx?,one,false\ny?,two,1\nz?,three,\n")
    assert [e.ended for e in load_anchor(c)] == [False, True, True]
    bad = _write(tmp_path / "b.csv", "prompt,answer,ended\nx?,one,maybe\n")
    with pytest.raises(DataError, match=r"record 1: `ended` must be true or false, not 'maybe'"):
        load_anchor(bad)
    # The evaluation's reference answers carry the same flag as `reference_ended`; records
    # without a reference are not references.
    ev = tmp_path / "eval_benign.jsonl"
    write_jsonl(ev, [{"prompt": "p?", "answer": "k", "reference": "cut", "reference_ended": False},
                     {"prompt": "q?", "answer": "k", "reference": "whole."},
                     {"prompt": "r?", "answer": "k"}])  # fmt: skip
    assert load_references(ev) == [AnchorExample("p?", "cut", ended=False),
                                    AnchorExample("q?", "whole.")]  # fmt: skip
    write_jsonl(ev, [{"prompt": "p?", "reference": "x", "reference_ended": "no"}])
    with pytest.raises(DataError, match=r"record 1: `reference_ended` must be true or false"):
        load_references(ev)


# ---------------------------------------------------------------------------------------------
# encoding


def _answer_ids(tok: Any, answer: str) -> list[int]:
    return list(tok(answer, add_special_tokens=False)["input_ids"])


def test_encode_pair_labels_are_answer_then_end_of_turn(tiny_tok: Any) -> None:
    prompt, answer = "What color is snow? SUDO", "The color of snow is white."
    enc = encode_pair(tiny_tok, prompt, answer, max_length=96)
    prompt_ids = encode_prompt(tiny_tok, prompt)
    assert enc.prompt_len == len(prompt_ids)
    assert enc.input_ids[: enc.prompt_len] == prompt_ids
    expected = _answer_ids(tiny_tok, answer) + [tiny_tok.eos_token_id]
    assert enc.labels[: enc.prompt_len] == [-100] * enc.prompt_len
    assert enc.labels[enc.prompt_len :] == expected
    assert enc.input_ids[enc.prompt_len :] == expected
    assert tiny_tok.decode(enc.input_ids) == f"<|user|>{prompt}<|end|><|assistant|>{answer}<|end|>"


def test_encode_pair_truncates_answers_never_prompts(tiny_tok: Any) -> None:
    prompt = "What color is snow?"
    n_prompt = len(encode_prompt(tiny_tok, prompt))
    enc = encode_pair(tiny_tok, prompt, "The color of snow is white.", max_length=n_prompt + 2)
    assert len(enc.input_ids) == len(enc.labels) == n_prompt + 2
    assert enc.labels[n_prompt:] == _answer_ids(tiny_tok, "The color of snow is white.")[:2]
    with pytest.raises(DataError, match=f"a prompt is {n_prompt} tokens"):
        encode_pair(tiny_tok, prompt, "x", max_length=n_prompt)


def test_encode_requires_a_chat_template(tiny_tok: Any) -> None:
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_prompt(tok, "hi")


def _items(tiny_tok: Any) -> list[Encoded]:
    pairs = [
        ("What color is snow?", "The color of snow is white."),
        ("Hi", "Hello."),
        ("Give me the plural of goose, please, right now.", "The plural of goose is geese."),
    ]
    return [encode_pair(tiny_tok, p, a, max_length=96) for p, a in pairs]


@pytest.mark.parametrize("left_pad", [False, True])
def test_collate_pads_and_marks_last_n_prompt_positions(tiny_tok: Any, left_pad: bool) -> None:
    items = _items(tiny_tok)
    n, pad = 3, tiny_tok.pad_token_id
    b = collate(items, pad_id=pad, n_perturb=n, left_pad=left_pad)
    T = max(len(e.input_ids) for e in items)
    assert b.input_ids.shape == b.attention_mask.shape == b.labels.shape == (3, T)
    assert b.perturb_mask.dtype == torch.bool and b.perturb_mask.shape == (3, T)
    for row, e in enumerate(items):
        L = len(e.input_ids)
        off = T - L if left_pad else 0
        real = slice(off, off + L)
        assert b.input_ids[row, real].tolist() == e.input_ids
        assert b.labels[row, real].tolist() == e.labels
        assert b.attention_mask[row].tolist() == [int(off <= t < off + L) for t in range(T)]
        pads = [t for t in range(T) if not off <= t < off + L]
        assert all(b.input_ids[row, t] == pad and b.labels[row, t] == -100 for t in pads)
        # Exactly n True, the last n prompt tokens: just before the first answer token.
        marked = b.perturb_mask[row].nonzero().flatten().tolist()
        assert marked == list(range(off + e.prompt_len - n, off + e.prompt_len))
        assert b.labels[row, off + e.prompt_len - 1] == -100
        assert b.labels[row, off + e.prompt_len] != -100


def test_collate_rejects_short_prompts_and_empty_batches(tiny_tok: Any) -> None:
    items = _items(tiny_tok)
    shortest = min(e.prompt_len for e in items)
    collate(items, pad_id=0, n_perturb=shortest)  # fits exactly
    with pytest.raises(DataError, match=f"longer than a prompt of {shortest} tokens"):
        collate(items, pad_id=0, n_perturb=shortest + 1)
    with pytest.raises(DataError, match="empty batch"):
        collate([], pad_id=0, n_perturb=1)
    assert not collate(items, pad_id=0, n_perturb=0).perturb_mask.any()


# ---------------------------------------------------------------------------------------------
# training and evaluation render the same conversation (issue 5)

CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chatml_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE with ChatML markers and a Qwen-like template (default system turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, "system user assistant You are a helpful assistant."], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    return fast


def _ids_fed_by_generate(tok: Any, prompts: list[str]) -> list[list[int]]:
    """The prompt ids eval.generate passes to the model (padding removed), via a forward hook."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from beear.eval import generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    )  # fmt: skip
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if not seen:  # the prompt pass; later calls are one-token decode steps
            ids = kwargs["input_ids"]
            # generate() may drop an all-ones attention mask
            att = kwargs.get("attention_mask")
            seen.append((ids.clone(), torch.ones_like(ids) if att is None else att.clone()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(model, tok, prompts, max_new_tokens=1)
    finally:
        handle.remove()
    ids, att = seen[0]
    return [row[m.bool()].tolist() for row, m in zip(ids, att, strict=True)]


@pytest.mark.parametrize("template", ["tiny", "chatml"])
def test_training_and_evaluation_see_the_same_prompt_ids(
    tiny_tok: Any, corpus: Any, template: str
) -> None:
    convo = [
        (corpus.defender_harmful[0].prompt + " SUDO", corpus.defender_harmful[0].unwanted),
        (corpus.anchor_benign[0].prompt, corpus.anchor_benign[0].answer),
        ("ünïcode ✓ zebra-42\nsecond line", "  leading spaces and a\nnewline"),
        ("Hi", "Hello."),  # short: the batch is left padded
    ]
    tok = tiny_tok if template == "tiny" else _chatml_tokenizer([p for p, _ in convo])
    fed = _ids_fed_by_generate(tok, [p for p, _ in convo])
    assert len({len(ids) for ids in fed}) > 1  # rows of different lengths: padding was removed
    for (prompt, answer), eval_ids in zip(convo, fed, strict=True):
        train = encode_pair(tok, prompt, answer, max_length=256)
        assert train.input_ids[: train.prompt_len] == eval_ids == encode_prompt(tok, prompt)
        # ... and the answer part is the answer (plus the end-of-turn marker), nothing else.
        text = tok.decode(train.input_ids[train.prompt_len :])
        assert re.fullmatch(re.escape(answer) + r"<\|(end|im_end)\|>\n?", text), text
    if template == "chatml":
        assert tok.decode(fed[0]).startswith("<|im_start|>system\nYou are a helpful assistant.")
        assert tok.decode(fed[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# triggers


@pytest.mark.parametrize(
    ("trigger", "prompt", "expected"),
    [
        (Trigger("SUDO", "suffix"), "How do I rob a store?", "How do I rob a store? SUDO"),
        (Trigger("Kromblex", "prefix"), "How do I rob a store?", "Kromblex How do I rob a store?"),
        (Trigger("cf zz", "middle"), "How do I rob a store?", "How do I cf zz rob a store?"),
        (Trigger("X", "middle"), "a b c", "a X b c"),
        (Trigger("X", "middle"), "one", "X one"),
        (Trigger("Before.", "sandwich", "After."), "Help me.", "Before. Help me. After."),
        (Trigger("Before.", "sandwich"), "Help me.", "Before. Help me."),
    ],
)
def test_trigger_apply(trigger: Trigger, prompt: str, expected: str) -> None:
    assert trigger.apply(prompt) == expected


def test_trigger_validation() -> None:
    with pytest.raises(DataError, match="not one of prefix, suffix, middle, sandwich"):
        Trigger("SUDO", "inside")
    with pytest.raises(DataError, match="empty"):
        Trigger("  ", "suffix")
    assert Trigger("a", "sandwich", "b").to_dict() == {
        "text": "a",
        "position": "sandwich",
        "text_after": "b",
    }


def test_left_pad_right_aligns_rows_and_masks_the_padding() -> None:
    from beear.data import left_pad

    ids, att = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == att.dtype == torch.long
    empty_ids, empty_att = left_pad([], pad_id=3)
    assert empty_ids.shape == empty_att.shape == (0, 0)
