"""Hidden-state hooks: the only place in beear that perturbs hidden states.

BEEAR's `F_θ^l(x, δ)` (DESIGN.md §2) runs decoder layers 0..l, adds δ to the hidden states that
layer l outputs at chosen token positions, and runs the rest of the model on the result.

- `decoder_layers` / `resolve_layer` find the decoder block list and a layer index.
- `perturb` adds δ at layer l during ordinary forwards and `generate()` (the uncached path).
- `capture` records what layer l outputs, e.g. once per batch before the inner loop.
- `substitute` is the cached fast path of the inner loop: it feeds captured layer-l hidden
  states (+ δ) into layers l+1..L-1 without recomputing layers 0..l.

Positions: δ has shape (n, d) and `mask` is a bool (B, T) tensor; the j-th True position of row b
gets δ[j], so a row may have up to n True positions (0 leaves the row unperturbed). Additions are
out of place, `h + add.to(h.dtype)`, so δ can stay float32 (and carry a gradient) in a bf16 model.

Tested on transformers 5.x (layers return a Tensor) with Llama, Mistral, Qwen2, Gemma, Phi, GPT-2,
GPT-NeoX and PEFT-wrapped Llama; 4.x-style layers (returning a tuple) only through a test double.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Where causal LMs keep their decoder blocks, relative to the transformers model, tried in order.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: nn.Module, *, path: str | None = None) -> nn.ModuleList:
    """Return the decoder block list of a causal LM (also one wrapped by PEFT).

    Known layouts: `model.layers` (Llama, Mistral, Qwen2, Gemma, Phi), `transformer.h` (GPT-2),
    `gpt_neox.layers` (GPT-NeoX), `model.decoder.layers` (OPT). For anything else pass `path`,
    a dotted attribute path such as "model.layers"; it is looked up on `model` and, for PEFT
    models, on the wrapped transformers model. Raises ValueError if nothing is found.
    """
    roots = [model]
    # PeftModel -> LoraModel -> transformers model; get_base_model() unwraps both levels.
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        roots.append(get_base_model())
    for candidate in (path,) if path is not None else _LAYER_PATHS:
        for root in roots:
            found: Any = root
            for name in candidate.split("."):
                found = getattr(found, name, None)
            if isinstance(found, nn.ModuleList):
                return found
    if path is not None:
        raise ValueError(f"no torch.nn.ModuleList at path {path!r} in {type(model).__name__}")
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} "
        f"(tried {', '.join(_LAYER_PATHS)}); pass path='dotted.path.to.layers'"
    )


def resolve_layer(model: nn.Module, layer: int | None, *, path: str | None = None) -> int:
    """Turn a user's layer choice into a non-negative index into `decoder_layers(model)`.

    None picks the paper's default, about 0.3 of the depth (layer 9 of 32); negative indices
    count from the end like Python's. Raises ValueError when the index is out of range.
    """
    n_layers = len(decoder_layers(model, path=path))
    if layer is None:
        # At most L-2 so that at least one decoder layer processes the perturbed states.
        return max(0, min(int(0.3 * n_layers), n_layers - 2))
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range for a model with {n_layers} decoder layers "
            f"(valid: {-n_layers}..{n_layers - 1})"
        )
    return layer % n_layers


@dataclass
class Perturbation:
    """What `perturb` did: counts of forward calls of the hooked layer while it was active."""

    perturbed: int = 0  # calls whose length matched the mask: δ was added
    skipped: int = 0  # calls of another length (decode steps of generate()): left unchanged


@dataclass
class Captured:
    """Filled by `capture`: `hidden` is the (B, T, d) output of the layer in the last forward."""

    hidden: Tensor | None = None


@contextlib.contextmanager
def perturb(
    model: nn.Module, layer: int, delta: Tensor, mask: Tensor, *, path: str | None = None
) -> Iterator[Perturbation]:
    """Add δ to the output of decoder layer `layer` at the True positions of `mask`.

        with perturb(model, layer, delta, mask):
            logits = model(input_ids, attention_mask=attention_mask).logits

    `delta` is (n, d), usually float32 and trainable; `mask` is bool (B, T) for the same batch
    (at most n True per row). Only forwards whose length equals the mask's T are perturbed:
    in `generate()` with a KV cache that is the prompt pass, and the one-token decode steps that
    follow are left unchanged (their positions lie after the prompt). Yields a `Perturbation`
    counting both kinds of call. The hook is removed on exit, also after an exception. With
    gradient checkpointing, call backward() inside the context: recomputation re-runs the hook.
    """
    module = decoder_layers(model, path=path)[resolve_layer(model, layer, path=path)]
    idx = _positions(delta, mask)
    stats = Perturbation()

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = _hidden_of(output)
        if hidden.shape[1] != mask.shape[1]:
            stats.skipped += 1
            return output
        stats.perturbed += 1
        return _with_hidden(output, _add_at(hidden, delta, mask, idx))

    handle = module.register_forward_hook(hook)
    try:
        yield stats
    finally:
        handle.remove()


@contextlib.contextmanager
def capture(model: nn.Module, layer: int, *, path: str | None = None) -> Iterator[Captured]:
    """Record the output hidden states of decoder layer `layer`.

        with capture(model, layer) as cap:
            model(input_ids, attention_mask=attention_mask)
        hidden = cap.hidden.detach()

    The tensor is not detached (callers decide). Hooks on a layer run in the order they were
    registered, so a `capture` entered inside `perturb` on the same layer sees the perturbed output.
    """
    module = decoder_layers(model, path=path)[resolve_layer(model, layer, path=path)]
    captured = Captured()

    def hook(hooked: nn.Module, _args: Any, output: Any) -> None:
        _TUPLE_OUTPUT[hooked] = isinstance(output, tuple)  # saves `substitute` its probe
        captured.hidden = _hidden_of(output)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def substitute(
    model: nn.Module,
    layer: int,
    hidden: Tensor,
    delta: Tensor | None,
    mask: Tensor | None,
    *,
    path: str | None = None,
) -> Iterator[None]:
    """Run only layers layer+1..L-1, starting from captured layer-`layer` states (+ δ at mask).

        with capture(model, layer) as cap, torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
        hidden = cap.hidden.detach()
        for step in range(inner_steps):
            with substitute(model, layer, hidden, delta, mask):
                logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits

    Gives the same result as `perturb` with the same δ and mask (layers 0..layer do not depend
    on δ, DESIGN.md §2), at the cost of only the later layers. The caller passes the same batch
    so embeddings, positions and attention masks are still computed normally. While active,
    layers 0..layer are swapped out of the ModuleList for stand-ins (so their parameters are not
    in `model.parameters()`); they are put back on exit, also after an exception. Pass both
    `delta` and `mask`, or neither (no perturbation). Use `use_cache=False`, and do not ask for
    `output_hidden_states`/`output_attentions`: the stand-ins have no cache or attention.
    """
    if (delta is None) != (mask is None):
        raise ValueError("substitute() needs both delta and mask, or neither")
    layers = decoder_layers(model, path=path)
    index = resolve_layer(model, layer, path=path)
    idx = _positions(delta, mask) if delta is not None and mask is not None else None
    as_tuple = _returns_tuple(model, layers[index])
    originals = list(layers[: index + 1])
    try:
        # Swapping inside try: the finally block puts back whatever was swapped so far.
        for i, real in enumerate(originals):
            last = i == index
            layers[i] = _StandIn(real, as_tuple, hidden if last else None, delta, mask, idx)
        yield
    finally:
        for i, real in enumerate(originals):
            layers[i] = real


class _StandIn(nn.Module):
    """Replaces a real decoder layer inside `substitute`.

    Before the chosen layer it passes its input through (the value is never used); at the chosen
    layer it returns the captured states plus δ. It returns a tuple `(h,)` if the real layer
    returns a tuple (transformers 4.x) and a Tensor otherwise, so the model's loop unpacks it.
    """

    def __init__(
        self,
        real: nn.Module,
        as_tuple: bool,
        hidden: Tensor | None,
        delta: Tensor | None,
        mask: Tensor | None,
        idx: Tensor | None,
    ) -> None:
        super().__init__()
        # Some model loops read this from the layer to pick its attention mask (sliding window).
        if hasattr(real, "attention_type"):
            self.attention_type = real.attention_type
        self.as_tuple = as_tuple
        self.hidden, self.delta, self.mask, self.idx = hidden, delta, mask, idx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = args[0] if args else kwargs["hidden_states"]
        if self.hidden is not None:
            if out.shape[:2] != self.hidden.shape[:2]:
                raise ValueError(
                    f"substitute() got a batch of shape {tuple(out.shape[:2])} but the captured "
                    f"hidden states have shape {tuple(self.hidden.shape[:2])}"
                )
            out = self.hidden
            if self.delta is not None and self.mask is not None and self.idx is not None:
                out = _add_at(out, self.delta, self.mask, self.idx)
        return (out,) if self.as_tuple else out


# Whether a decoder layer returns a tuple, per layer object: a fact about its code, so learned once
# (from a `capture` or a probe) and forgotten with the module.
_TUPLE_OUTPUT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _returns_tuple(model: nn.Module, module: nn.Module) -> bool:
    """Whether `module` returns a tuple (transformers 4.x, some remote code) or a Tensor (5.x).

    Version checks or annotations would miss custom layers, so look at a real output: one forward
    of a single token without gradients, with the RNG state restored so train-mode dropout draws
    the same numbers as without the probe. Skipped when a `capture` already saw this layer.
    """
    if module not in _TUPLE_OUTPUT:

        def hook(hooked: nn.Module, _args: Any, output: Any) -> None:
            _TUPLE_OUTPUT[hooked] = isinstance(output, tuple)

        handle = module.register_forward_hook(hook)
        device = model.get_input_embeddings().weight.device  # type: ignore[operator]
        try:
            rng_devices = [device] if device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                model(
                    input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False
                )
        finally:
            handle.remove()
    return _TUPLE_OUTPUT[module]


def _positions(delta: Tensor, mask: Tensor) -> Tensor:
    """Check δ and mask; return, per (b, t), which row of δ goes there: (B, T) long."""
    if delta.ndim != 2:
        raise ValueError(f"delta must have shape (n, d), got {tuple(delta.shape)}")
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be a bool (B, T) tensor, got {mask.dtype} {tuple(mask.shape)}")
    most = int(mask.sum(dim=1).max()) if mask.numel() else 0
    if most > delta.shape[0]:
        raise ValueError(f"mask has {most} True positions in a row but delta has {delta.shape[0]}")
    # The j-th True position of a row gets delta[j]; clamp only affects positions masked out.
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _add_at(hidden: Tensor, delta: Tensor, mask: Tensor, idx: Tensor) -> Tensor:
    """`hidden + δ` at the mask's positions, out of place, in the hidden states' dtype."""
    if hidden.shape[:2] != mask.shape or hidden.shape[-1] != delta.shape[1]:
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} do not fit mask {tuple(mask.shape)} "
            f"and delta {tuple(delta.shape)}"
        )
    mask, idx = mask.to(hidden.device), idx.to(hidden.device)
    add = torch.where(mask[..., None], delta.to(hidden.device)[idx], 0.0)  # (B, T, d)
    return hidden + add.to(hidden.dtype)


def _hidden_of(output: Any) -> Tensor:
    # transformers 5.x layers return the hidden states; 4.x return (hidden_states, ...).
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
