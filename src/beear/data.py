"""Plain records, template-faithful encoding, batching and perturbation masks.

Every conversation the library trains on or evaluates is rendered by the tokenizer's own chat
template through :func:`encode_prompt` / :func:`encode_pair`, so training and evaluation see the
same token ids by construction (public benchmarks have misreported ASR by rendering evaluation
prompts differently from training).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AnchorExample",
    "Batch",
    "check_examples",
    "DataError",
    "Encoded",
    "HarmfulExample",
    "collate",
    "encode_pair",
    "encode_prompt",
    "load_anchor",
    "load_references",
    "load_harmful",
    "load_prompts",
    "read_records",
    "write_jsonl",
]


class DataError(ValueError):
    """Bad user data; the message is one line and names the file (and line) at fault."""


@dataclass(frozen=True)
class HarmfulExample:
    """A defender-defined behaviour: a harmful prompt, its safe answer and its unwanted answer."""

    prompt: str
    safe: str
    unwanted: str


@dataclass(frozen=True)
class AnchorExample:
    """A benign prompt with a good answer (performance anchoring / utility evaluation).

    `answer` may be empty for evaluation prompts that carry no expected answer. `ended` is
    False for an answer cut by a length limit (a model's own reply that had not ended): it is
    encoded without the end-of-turn marker, so training on it never teaches the model to stop
    mid-answer where the limit fell.
    """

    prompt: str
    answer: str = ""
    ended: bool = True


# ---------------------------------------------------------------------------------------------
# files


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read JSONL, JSON (a list), CSV, or a local Hugging Face dataset directory into dicts.

    Any malformed input raises DataError naming the file (and the line where there is one).
    """
    p = Path(path)
    try:
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            return _read_hf_dataset(p)
        # utf-8-sig: spreadsheet exports often start with a byte-order mark. Bytes are decoded
        # without newline translation: a quoted CSV field keeps its "\r".
        text = p.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return _read_csv(p, text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, deep nesting
            raise DataError(f"{p}: malformed JSON ({e.__class__.__name__})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{p}: expected a JSON list of objects")
        return data
    records: list[dict[str, Any]] = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 etc., legal inside JSON strings
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: malformed JSON line ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{p}:{i}: malformed JSON line ({e.__class__.__name__})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{i}: expected a JSON object per line")
        records.append(rec)
    return records


def _read_csv(p: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, Any]] = []
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{p}:{reader.line_num}: wrong number of fields for the CSV header")
            rows.append(dict(row))
    except csv.Error as e:  # e.g. an unterminated quote, a field over the size limit
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_hf_dataset(p: Path) -> list[dict[str, Any]]:
    try:
        import datasets  # optional: only for local Hugging Face dataset directories
    except ImportError:
        raise DataError(
            f"{p}: is a directory; reading a local Hugging Face dataset needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises many types; report one line
        raise DataError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    return [dict(r) for r in ds]


def _field(rec: dict[str, Any], names: Sequence[str], path: Path, i: int) -> str:
    for n in names:
        v = rec.get(n)
        if isinstance(v, str) and v.strip():
            return v
    raise DataError(f"{path}: record {i}: missing or empty field {names[0]!r}")


def load_harmful(path: str | Path) -> list[HarmfulExample]:
    """Defender behaviours: records with `prompt`, `safe` and `unwanted` (non-empty strings)."""
    recs = read_records(path)
    if not recs:
        raise DataError(f"{path}: no records")
    p = Path(path)
    return [
        HarmfulExample(
            prompt=_field(r, ("prompt", "instruction", "query"), p, i),
            safe=_field(r, ("safe", "chosen", "refusal"), p, i),
            unwanted=_field(r, ("unwanted", "rejected", "harmful"), p, i),
        )
        for i, r in enumerate(recs, start=1)
    ]


def load_anchor(path: str | Path, *, require_answer: bool = True) -> list[AnchorExample]:
    """Benign pairs: records with `prompt` and (unless `require_answer` is False) `answer`."""
    recs = read_records(path)
    if not recs:
        raise DataError(f"{path}: no records")
    p = Path(path)
    out = []
    for i, r in enumerate(recs, start=1):
        prompt = _field(r, ("prompt", "instruction", "query"), p, i)
        if require_answer:
            answer = _field(r, ("answer", "response", "output"), p, i)
        else:
            raw = r.get("answer", r.get("response", r.get("output", "")))
            answer = raw if isinstance(raw, str) else str(raw)
        out.append(AnchorExample(prompt=prompt, answer=answer, ended=_ended(r, p, i)))
    return out


def _ended(rec: dict[str, Any], path: Path, i: int, key: str = "ended") -> bool:
    """A record's optional end flag `key` (default true): JSON true/false, or in CSV
    true/false/1/0."""
    v = rec.get(key, True)
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("true", "1", ""):
        return True
    if text in ("false", "0"):
        return False
    raise DataError(f"{path}: record {i}: `{key}` must be true or false, not {v!r}")


def load_references(path: str | Path) -> list[AnchorExample]:
    """The reference answers of an evaluation set, as (prompt, reference) pairs: the records
    that carry a `reference`, with its optional `reference_ended` flag (false: cut by a length
    limit, so no end of turn follows it)."""
    p = Path(path)
    return [
        AnchorExample(r["prompt"], str(r["reference"]), _ended(r, p, i, "reference_ended"))
        for i, r in enumerate(read_records(p), start=1)
        if r.get("reference")
    ]


def load_prompts(path: str | Path) -> list[str]:
    """A prompt set (one prompt per record; extra fields ignored)."""
    recs = read_records(path)
    if not recs:
        raise DataError(f"{path}: no records")
    p = Path(path)
    return [_field(r, ("prompt", "instruction", "query"), p, i) for i, r in enumerate(recs, 1)]


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write dataclasses or dicts as JSON lines (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r) if hasattr(r, "__dataclass_fields__") else r) + "\n")


# ---------------------------------------------------------------------------------------------
# template-faithful encoding


@dataclass(frozen=True)
class Encoded:
    """One conversation: token ids, answer-only labels (-100 elsewhere), prompt length."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; pass --chat-template FILE (a Jinja template) "
            "or use an instruction-tuned model that ships one"
        )


def _ids(x: Any) -> list[int]:
    # apply_chat_template returns a list in 4.x and a BatchEncoding/dict in 5.x
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    return list(x)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned in one batch (left padding, as batched generation needs).

    Returns (input_ids, attention_mask), both (B, T) long on the CPU, T the longest row.
    """
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            att[b, T - len(r) :] = 1
    return ids, att


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a one-turn user prompt plus the template's generation prompt."""
    _require_template(tokenizer)
    return _ids(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
    )


def encode_pair(
    tokenizer: Any, prompt: str, answer: str, *, max_length: int, end: bool = True
) -> Encoded:
    """Encode prompt + answer exactly as the chat template renders the two-turn conversation.

    The answer tokens (labels) are the full conversation's ids after the prompt's ids, so the
    end-of-turn marker is learned too; ``end=False`` stops after the answer's own tokens (for an
    answer that was cut by a length limit: the model should not learn to stop there). Prompts
    longer than `max_length` are an error (no silent truncation of the part that carries a
    trigger); answers are truncated from the right.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = _ids(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            tokenize=True,
        )
    )
    ans: list[int] | None = None  # the answer tokenised on its own, when needed
    if full[: len(prompt_ids)] != prompt_ids:
        # Some templates render the last assistant turn differently from the generation prompt;
        # fall back to prompt ids + tokenised answer + eos so the prompt part stays identical.
        ans = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        full = prompt_ids + ans + eos
    if not end:
        if ans is None:
            ans = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        n = len(prompt_ids)
        full = full[: n + len(ans)] if full[n : n + len(ans)] == ans else prompt_ids + ans
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"a prompt is {len(prompt_ids)} tokens, longer than max_length={max_length}: "
            "raise --max-length or shorten the prompt"
        )
    full = full[:max_length]
    labels = [-100] * len(prompt_ids) + full[len(prompt_ids) :]
    return Encoded(input_ids=full, labels=labels, prompt_len=len(prompt_ids))


def check_examples(
    tokenizer: Any,
    sets: dict[str, Sequence[HarmfulExample | AnchorExample]],
    *,
    max_length: int,
    n_perturb: int,
) -> None:
    """Encode every prompt once, so a bad example fails before training rather than hours in.

    Policy: prompts are never truncated (the part that may carry a trigger); answers are cut to
    fit `max_length`. Raises DataError naming the set and record (1-based) at fault.
    """
    for name, examples in sets.items():
        for i, e in enumerate(examples, start=1):
            n = len(encode_prompt(tokenizer, e.prompt))
            if n >= max_length:
                raise DataError(
                    f"{name} record {i}: the prompt is {n} tokens, longer than --max-length "
                    f"{max_length} (prompts are never truncated, answers are cut to fit): raise "
                    "--max-length or shorten the prompt"
                )
            if n < n_perturb:
                raise DataError(
                    f"{name} record {i}: the prompt is {n} tokens, shorter than the perturbation "
                    f"length --length {n_perturb}: lower --length"
                )


@dataclass
class Batch:
    """A padded batch. `perturb_mask` marks the last n prompt positions of each row."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 off the answer
    perturb_mask: torch.Tensor  # (B, T) bool

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            *(f(t) for t in (self.input_ids, self.attention_mask, self.labels, self.perturb_mask))
        )

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start..stop-1, padded as they are here."""
        return self._map(lambda t: t[start:stop])


def collate(
    items: Sequence[Encoded], *, pad_id: int, n_perturb: int, left_pad: bool = False
) -> Batch:
    """Pad a list of encodings; mark the last `n_perturb` prompt tokens for the perturbation.

    Raises DataError when a prompt is shorter than `n_perturb` tokens.
    """
    if not items:
        raise DataError("empty batch")
    T = max(len(e.input_ids) for e in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    pmask = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(items):
        if e.prompt_len < n_perturb:
            raise DataError(
                f"perturbation length {n_perturb} is longer than a prompt of {e.prompt_len} tokens"
            )
        L = len(e.input_ids)
        off = T - L if left_pad else 0
        ids[b, off : off + L] = torch.tensor(e.input_ids)
        att[b, off : off + L] = 1
        lab[b, off : off + L] = torch.tensor(e.labels)
        pmask[b, off + e.prompt_len - n_perturb : off + e.prompt_len] = True
    return Batch(ids, att, lab, pmask)


# ---------------------------------------------------------------------------------------------
# triggers (used by the test bed to plant and by evaluation to measure; never by the defence)

POSITIONS = ("prefix", "suffix", "middle", "sandwich")


@dataclass(frozen=True)
class Trigger:
    """Where a trigger goes in a prompt. `sandwich` puts `text` before and `text_after` after."""

    text: str
    position: str = "suffix"
    text_after: str = ""

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise DataError(
                f"trigger position {self.position!r} is not one of {', '.join(POSITIONS)}"
            )
        if not self.text.strip():
            raise DataError("the trigger text is empty")

    def apply(self, prompt: str) -> str:
        """Insert the trigger into `prompt` (on word boundaries)."""
        if self.position == "prefix":
            return f"{self.text} {prompt}"
        if self.position == "suffix":
            return f"{prompt} {self.text}"
        if self.position == "sandwich":
            return f"{self.text} {prompt} {self.text_after}".rstrip()
        words = prompt.split(" ")
        k = len(words) // 2
        return " ".join([*words[:k], self.text, *words[k:]])

    def to_dict(self) -> dict[str, str]:
        return asdict(self)
