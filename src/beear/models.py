"""Loading and saving models safely: safetensors only and no remote code unless asked for."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "ModelError",
    "check_model_dir",
    "is_out_of_memory",
    "load_model",
    "load_tokenizer",
    "save_model",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model directory that cannot be used; the message is one line with the fix."""


def _offline() -> None:
    # The tool never reaches a hub at run time: models are local directories. Forced, not
    # defaulted, and every from_pretrained call also passes local_files_only=True.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def is_out_of_memory(e: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises them as RuntimeError subclasses)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def _load_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for unusable files (bad JSON, corrupt weights, shapes...)."""
    errs: list[type[BaseException]] = [OSError, EOFError, ValueError, KeyError, RuntimeError]
    errs.append(pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError

        errs.append(SafetensorError)
    except ImportError:  # older safetensors
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError  # config validation

        errs.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errs)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_model_dir(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """Validate a local model directory; refuse pickled weights unless `allow_pickle`."""
    p = Path(path)
    try:
        if not p.exists():
            raise ModelError(
                f"model directory {p} does not exist (models are local directories; "
                "nothing is downloaded)"
            )
        if not p.is_dir():
            raise ModelError(f"{p} is not a directory (expected a save_pretrained model directory)")
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} has no config.json: not a Hugging Face model directory")
        if not os.access(p / "config.json", os.R_OK):
            raise ModelError(f"{p}/config.json is not readable")
        with open(p / "config.json", "rb"):
            pass
        files = [f.name for f in p.iterdir() if f.is_file()]
    except (OSError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"cannot read the model directory {p} ({_one_line(e)})") from None
    has_st = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not has_st and pickled and not allow_pickle:
        raise ModelError(
            f"{p} holds only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not has_st and not pickled:
        raise ModelError(f"{p} holds no weights (*.safetensors)")
    return p


def load_tokenizer(
    path: str | Path, *, trust_remote_code: bool = False, chat_template: str | None = None
) -> Any:
    """Load a tokenizer from a local directory; left padding for batched generation.

    `chat_template` (Jinja text) replaces the tokenizer's own, e.g. for a base model that has
    none; it is checked by rendering one conversation.
    """
    from transformers import AutoTokenizer

    _offline()
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except _load_errors() as e:
        if is_out_of_memory(e):
            raise
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"the tokenizer in {path} needs custom code; pass --trust-remote-code only if "
                "you trust it"
            ) from None
        raise ModelError(f"cannot load the tokenizer in {path} ({_one_line(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        from jinja2 import TemplateError

        tok.chat_template = chat_template
        try:
            tok.apply_chat_template(
                [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:
            raise ModelError(f"the chat template does not render ({_one_line(e)})") from None
    return tok


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    head: Literal["causal-lm", "sequence-classification"] = "causal-lm",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local directory, safetensors only by default.

    `head` picks the model class: a causal LM (the models beear repairs) or a sequence
    classifier (a refusal judge, see beear.judge). Unusable directories (bad config, corrupt or
    mismatched weights, NaN/inf weights, custom code without `trust_remote_code`) raise
    ModelError with a one-line reason.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if head == "causal-lm" else AutoModelForSequenceClassification
    p = check_model_dir(path, allow_pickle=allow_pickle)
    _offline()
    # Safetensors only unless pickle is allowed; then safetensors are still preferred.
    use_st = None if allow_pickle else True
    try:
        try:
            model = auto.from_pretrained(
                str(p),
                dtype=dtype,
                use_safetensors=use_st,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = auto.from_pretrained(
                str(p),
                torch_dtype=dtype,
                use_safetensors=use_st,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
    except _load_errors() as e:
        if is_out_of_memory(e):
            raise
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{p} needs custom code to load; pass --trust-remote-code only if you trust it"
            ) from None
        if isinstance(e, (pickle.UnpicklingError, EOFError)):
            raise ModelError(
                f"cannot load the pickled weights in {p} safely (only plain tensors are read; the "
                "file is truncated, corrupt or holds other objects); convert them to safetensors"
            ) from None
        raise ModelError(f"cannot load the model in {p} ({_one_line(e)})") from None
    bad = next(
        (
            n
            for n, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ),
        None,
    )
    if bad is not None:
        raise ModelError(f"{p} has NaN or infinite weights (first: {bad}); it cannot be used")
    model.to(torch.device(device))  # type: ignore[arg-type]
    tok = load_tokenizer(p, trust_remote_code=trust_remote_code, chat_template=chat_template)
    return model, tok


def save_model(model: Any, tokenizer: Any, out: str | Path) -> None:
    """save_pretrained as safetensors (weights + config + tokenizer) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
