"""Tests for beear.hooks on tiny random models built in-process (CPU, offline)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
)

from beear import hooks
from beear.hooks import capture, decoder_layers, perturb, resolve_layer, substitute

VOCAB, D, N_LAYERS = 100, 32, 4
_SMALL = dict(
    hidden_size=D,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    vocab_size=VOCAB,
)

# arch -> (config, where its decoder layers really are)
ARCHS: dict[str, tuple[Callable[[], PretrainedConfig], Callable[[nn.Module], nn.Module]]] = {
    "llama": (lambda: LlamaConfig(**_SMALL, num_key_value_heads=2), lambda m: m.model.layers),
    "mistral": (lambda: MistralConfig(**_SMALL, num_key_value_heads=2), lambda m: m.model.layers),
    "qwen2": (lambda: Qwen2Config(**_SMALL, num_key_value_heads=2), lambda m: m.model.layers),
    "gemma": (
        lambda: GemmaConfig(**_SMALL, num_key_value_heads=2, head_dim=8),
        lambda m: m.model.layers,
    ),
    "phi": (lambda: PhiConfig(**_SMALL), lambda m: m.model.layers),
    "gpt2": (
        lambda: GPT2Config(n_embd=D, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64),
        lambda m: m.transformer.h,
    ),
    "gpt_neox": (lambda: GPTNeoXConfig(**_SMALL), lambda m: m.gpt_neox.layers),
}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ARCHS[arch][0]()).eval()


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    """A left-padded batch and a perturbation mask with different positions per row.

    Rows 2 and 3 have fewer True positions than delta has rows (1 and 0).
    """
    torch.manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (4, 6))
    attention_mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]]
    )
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 3:6] = True
    mask[2, 5] = True
    return input_ids, attention_mask, mask


def _delta(n: int = 3, d: int = D, scale: float = 3.0) -> Tensor:
    torch.manual_seed(2)
    return (scale * torch.randn(n, d)).requires_grad_()


def _expected_add(delta: Tensor, mask: Tensor) -> Tensor:
    """Reference, written as loops: row b's j-th True position gets delta[j]."""
    add = torch.zeros(*mask.shape, delta.shape[1])
    for b in range(mask.shape[0]):
        for j, t in enumerate(mask[b].nonzero().flatten().tolist()):
            add[b, t] = delta[j].detach()
    return add


def _stack(n_layers: int) -> nn.Module:
    """A bare module with `model.layers` of the given depth, for index arithmetic."""
    root, inner = nn.Module(), nn.Module()
    inner.layers = nn.ModuleList(nn.Identity() for _ in range(n_layers))
    root.model = inner
    return root


# --- resolver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_finds_each_architecture(arch: str) -> None:
    model = _model(arch)
    layers = decoder_layers(model)
    assert layers is ARCHS[arch][1](model)
    assert len(layers) == N_LAYERS


def test_decoder_layers_unwraps_peft() -> None:
    peft = pytest.importorskip("peft")
    model = _model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is model.model.layers
    assert decoder_layers(wrapped, path="model.layers") is model.model.layers


def test_decoder_layers_path_override_and_errors() -> None:
    odd = nn.Module()
    odd.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])
    assert decoder_layers(odd, path="blocks") is odd.blocks
    with pytest.raises(ValueError, match="path=") as err:
        decoder_layers(odd)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'model.nope'"):
        decoder_layers(_model("llama"), path="model.nope")
    # An override wins over the known layouts.
    stack = _stack(3)
    stack.model.other = nn.ModuleList([nn.Identity()])
    assert decoder_layers(stack, path="model.other") is stack.model.other


@pytest.mark.parametrize(("n_layers", "expected"), [(32, 9), (30, 9), (4, 1), (2, 0), (1, 0)])
def test_resolve_layer_default(n_layers: int, expected: int) -> None:
    assert resolve_layer(_stack(n_layers), None) == expected


def test_resolve_layer_negative_and_out_of_range() -> None:
    stack = _stack(32)
    assert resolve_layer(stack, -1) == 31
    assert resolve_layer(stack, -32) == 0
    assert resolve_layer(stack, 31) == 31
    message = "layer 40 is out of range for a model with 32 decoder layers (valid: -32..31)"
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_layer(stack, 40)
    with pytest.raises(ValueError, match="layer -33 is out of range"):
        resolve_layer(stack, -33)


# --- perturb / capture ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_delta_is_identity(arch: str) -> None:
    model = _model(arch)
    input_ids, attention_mask, mask = _batch()
    with torch.no_grad():
        clean = model(input_ids, attention_mask=attention_mask).logits
        with perturb(model, 1, torch.zeros(3, D), mask) as stats:
            hooked = model(input_ids, attention_mask=attention_mask).logits
    assert stats.perturbed == 1
    assert torch.equal(hooked, clean)


@pytest.mark.parametrize("arch", ARCHS)
def test_adds_delta_rows_at_masked_positions_only(arch: str) -> None:
    model = _model(arch)
    input_ids, attention_mask, mask = _batch()
    delta = _delta()
    with torch.no_grad():
        with capture(model, 1) as clean:
            model(input_ids, attention_mask=attention_mask)
        # Hooks run in registration order: `first` sees the layer's own output, `hit` the sum.
        with capture(model, 1) as first, perturb(model, 1, delta, mask), capture(model, 1) as hit:
            model(input_ids, attention_mask=attention_mask)
    assert clean.hidden is not None and hit.hidden is not None
    assert torch.equal(first.hidden, clean.hidden)  # not edited in place
    assert torch.equal(hit.hidden, clean.hidden + _expected_add(delta, mask))
    assert torch.equal(hit.hidden[~mask], clean.hidden[~mask])
    assert not torch.equal(hit.hidden[mask], clean.hidden[mask])


def test_bad_masks_are_rejected() -> None:
    model = _model("llama")
    input_ids, attention_mask, mask = _batch()
    with pytest.raises(ValueError, match="True positions"), perturb(model, 1, _delta(n=2), mask):
        pass
    with pytest.raises(ValueError, match="bool"), perturb(model, 1, _delta(), mask.long()):
        pass
    # Same length, wrong batch: an error, not a silent skip.
    with pytest.raises(ValueError, match="do not fit"), perturb(model, 1, _delta(), mask[:2]):
        model(input_ids, attention_mask=attention_mask)
    assert not decoder_layers(model)[1]._forward_hooks


def test_logits_bit_identical_after_exit_and_after_exception() -> None:
    model = _model("llama")
    input_ids, attention_mask, mask = _batch()
    layer = decoder_layers(model)[1]
    with torch.no_grad():
        clean = model(input_ids, attention_mask=attention_mask).logits
        with perturb(model, 1, _delta(), mask):
            hooked = model(input_ids, attention_mask=attention_mask).logits
        assert not torch.equal(hooked, clean)
        assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, clean)
        with pytest.raises(RuntimeError, match="boom"), perturb(model, 1, _delta(), mask):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"), capture(model, 1):
            raise RuntimeError("boom")
        assert not layer._forward_hooks
        assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, clean)


def test_gradient_reaches_fp32_delta_through_bf16_model() -> None:
    model = _model("llama").to(torch.bfloat16)
    input_ids, attention_mask, mask = _batch()
    mask[0, 3] = mask[1, 5] = False  # no row uses delta[2] now: its gradient must stay zero
    delta = _delta()
    with perturb(model, 1, delta, mask):
        logits = model(input_ids, attention_mask=attention_mask).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten())
    loss.backward()
    assert delta.grad is not None and delta.grad.dtype == torch.float32
    assert torch.isfinite(delta.grad).all()
    assert delta.grad[:2].abs().sum(dim=1).min() > 0
    assert torch.equal(delta.grad[2], torch.zeros(D))


def test_generate_perturbs_prompt_pass_only() -> None:
    model = _model("llama")
    torch.manual_seed(3)
    prompt = torch.randint(1, VOCAB, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 3:6] = True
    delta, new = _delta(scale=10.0).detach(), 3
    greedy = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with perturb(model, 1, delta, mask) as stats:
            out = model.generate(prompt, **greedy, output_logits=True, return_dict_in_generate=True)
        plain = model.generate(prompt, **greedy, output_logits=True, return_dict_in_generate=True)
    # One prompt pass (perturbed) and one-token decode steps (left alone).
    assert (stats.perturbed, stats.skipped) == (1, new - 1)
    assert not torch.allclose(out.logits[0], plain.logits[0])
    # Reference without a KV cache: full forwards, mask extended with False over new tokens.
    sequence = prompt
    for step in range(new):
        extended = F.pad(mask, (0, sequence.shape[1] - mask.shape[1]), value=False)
        with torch.no_grad(), perturb(model, 1, delta, extended):
            logits = model(sequence, use_cache=False).logits[:, -1]
        assert torch.allclose(out.logits[step], logits, atol=1e-5)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)


# --- substitute -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_substitute_matches_perturb(arch: str) -> None:
    model = _model(arch)
    input_ids, attention_mask, mask = _batch()
    layer, delta = 2, _delta()
    layers = decoder_layers(model)
    with torch.no_grad(), capture(model, layer) as cap:
        model(input_ids, attention_mask=attention_mask)
    assert cap.hidden is not None
    hidden = cap.hidden.detach()

    with perturb(model, layer, delta, mask):
        ref = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    (ref_grad,) = torch.autograd.grad(ref.square().mean(), delta)

    calls = [0] * N_LAYERS
    handles = [
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, m in enumerate(layers)
    ]
    try:
        with substitute(model, layer, hidden, delta, mask):
            out = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    (out_grad,) = torch.autograd.grad(out.square().mean(), delta)
    assert calls == [0, 0, 0, 1]  # layers 0..2 really skipped
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.allclose(out_grad, ref_grad, atol=1e-6, rtol=1e-4)


def test_substitute_without_delta_and_probe_keeps_rng() -> None:
    # A fresh model that no capture has seen: substitute must probe the output structure.
    # In train mode GPT-2's dropout would draw random numbers in that probe.
    model = _model("gpt2")
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = states.hidden_states[2]  # output of layer 1 (index 0 is the embeddings)
        assert decoder_layers(model)[1] not in hooks._TUPLE_OUTPUT
        model.train()
        rng = torch.get_rng_state()
        with substitute(model, 1, hidden, None, None):
            assert torch.equal(torch.get_rng_state(), rng)
            model.eval()
            out = model(input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(out, states.logits, atol=1e-5, rtol=0)
    with (
        pytest.raises(ValueError, match="both delta and mask"),
        substitute(model, 1, hidden, _delta(), None),
    ):
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_substitute_restores_layers(arch: str) -> None:
    model = _model(arch)
    input_ids, attention_mask, mask = _batch()
    layers = decoder_layers(model)
    before = list(layers)
    with torch.no_grad():
        clean = model(input_ids, attention_mask=attention_mask).logits
        with capture(model, 2) as cap:
            model(input_ids, attention_mask=attention_mask)
        assert cap.hidden is not None
        with substitute(model, 2, cap.hidden, _delta(), mask):
            assert all(a is not b for a, b in zip(layers[:3], before[:3], strict=True))
            model(input_ids, attention_mask=attention_mask)
        assert all(a is b for a, b in zip(layers, before, strict=True))
        assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, clean)
        # A batch of another shape is an error inside the forward; layers still come back.
        with (
            pytest.raises(ValueError, match="captured"),
            substitute(model, 2, cap.hidden, None, None),
        ):
            model(input_ids[:2], attention_mask=attention_mask[:2])
        assert all(a is b for a, b in zip(layers, before, strict=True))
        assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, clean)
    assert not any(m._forward_hooks for m in layers)


# --- 4.x-style layers that return tuples ------------------------------------------------------


class _TupleBlock(nn.Module):
    """A transformers-4.x-style decoder layer: returns (hidden_states, extra)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> tuple:
        return hidden_states + torch.tanh(self.proj(hidden_states)), "extra"


class _TupleLM(nn.Module):
    """A causal-LM test double whose loop unpacks `layer(...)[0]` like transformers 4.x."""

    def __init__(self, d: int = 16, n_layers: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(_TupleBlock(d) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab)
        self.outputs: list[object] = []  # what each layer returned, in call order

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False
    ) -> Tensor:
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            out = layer(hidden, attention_mask=attention_mask)
            self.outputs.append(out)
            hidden = out[0]
        return self.lm_head(hidden)


def test_tuple_layers_keep_their_structure() -> None:
    torch.manual_seed(0)
    model = _TupleLM().eval()
    _, attention_mask, mask = _batch()
    input_ids = torch.randint(0, 50, mask.shape)
    delta = _delta(d=16)
    with torch.no_grad():
        with capture(model, 1) as clean:
            model(input_ids, attention_mask=attention_mask)
        assert isinstance(clean.hidden, Tensor)
        model.outputs.clear()
        with perturb(model, 1, delta, mask), capture(model, 1) as hit:
            ref = model(input_ids, attention_mask=attention_mask)
    hooked = model.outputs[1]
    assert isinstance(hooked, tuple) and len(hooked) == 2 and hooked[1] == "extra"
    assert hit.hidden is hooked[0]
    assert torch.equal(hooked[0], clean.hidden + _expected_add(delta, mask))

    hooks._TUPLE_OUTPUT.clear()  # make substitute probe the structure, not reuse capture's
    model.outputs.clear()
    with torch.no_grad(), substitute(model, 1, clean.hidden, delta, mask):
        out = model(input_ids, attention_mask=attention_mask)
    stand_ins = model.outputs[-4:-2]  # the probe's outputs come first
    assert all(isinstance(o, tuple) and len(o) == 1 for o in stand_ins)
    assert torch.equal(out, ref)
