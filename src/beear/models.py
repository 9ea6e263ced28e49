"""Loading and saving models safely: safetensors only and no remote code unless asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelError", "check_model_dir", "load_model", "load_tokenizer", "save_model"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model directory that cannot be used; the message is one line with the fix."""


def _offline() -> None:
    # The tool never reaches a hub at run time: models are local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def check_model_dir(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """Validate a local model directory; refuse pickled weights unless `allow_pickle`."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise ModelError(f"{p} is not a directory (expected a save_pretrained model directory)")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} has no config.json: not a Hugging Face model directory")
    if not os.access(p / "config.json", os.R_OK):
        raise ModelError(f"{p}/config.json is not readable")
    files = [f.name for f in p.iterdir() if f.is_file()]
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


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local directory; left padding for batched generation."""
    from transformers import AutoTokenizer

    _offline()
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local directory, safetensors only by default."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, allow_pickle=allow_pickle)
    _offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            dtype=dtype,
            use_safetensors=not allow_pickle,
            trust_remote_code=trust_remote_code,
        )
    except TypeError:  # transformers 4.x spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            torch_dtype=dtype,
            use_safetensors=not allow_pickle,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{p} needs custom code to load; pass --trust-remote-code only if you trust it"
            ) from None
        raise
    model.to(torch.device(device))  # type: ignore[arg-type]
    tok = load_tokenizer(p, trust_remote_code=trust_remote_code)
    return model, tok


def save_model(model: Any, tokenizer: Any, out: str | Path) -> None:
    """save_pretrained as safetensors (weights + config + tokenizer) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
