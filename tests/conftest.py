"""Shared fixtures: the tiny test-bed tokenizer and corpus, small random Llama models, the
repository's scripts as modules, and (slow tests only) one backdoored test-bed model per
session."""

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from beear import attacks
from beear.attacks import TinyCorpus

# Same process setting as the CLI: subnormal floats make CPU backward passes far slower.
torch.set_flush_denormal(True)
torch.set_num_threads(2)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for a test on tiny models (`pytestmark = usefixtures(...)`).

    Their ops take microseconds, so a second thread only adds synchronisation, and when the two
    cores are shared with other work that costs 10-50x (measured: 48 greedy tokens of a 4-layer
    width-32 Llama took 0.2 s on one thread, 1.5-10 s on two on a busy machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], Any]:
    """`load_script("round_record")`: scripts/round_record.py imported as a module."""

    def load(name: str) -> Any:
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def corpus() -> TinyCorpus:
    """The synthetic instruction language of the test bed, seed 0."""
    return attacks.build_tiny_corpus(0)


@pytest.fixture(scope="session")
def tiny_tok(corpus: TinyCorpus) -> Any:
    """The test bed's byte-level BPE with its chat template, trained on the whole corpus."""
    trigger = attacks.SETTINGS["suffix-word"]
    texts = [e.prompt for e in corpus.train_harmful] + [e.unwanted for e in corpus.train_harmful]
    texts += [e.prompt for e in corpus.defender_harmful] + [attacks.REFUSAL]
    texts += [b.prompt for b in corpus.train_benign] + [b.answer for b in corpus.train_benign]
    texts += [b.prompt for b in corpus.anchor_benign] + [b.prompt for b in corpus.eval_benign]
    texts += corpus.eval_harmful + [trigger.apply(p) for p in corpus.eval_harmful[:20]]
    return attacks.build_tokenizer(texts)


@pytest.fixture(scope="session")
def make_model(tiny_tok: Any) -> Callable[..., Any]:
    """Factory of small random Llama models over the tiny tokenizer (deterministic per seed).

    4 decoder layers of width 32: big enough for every code path (layer 1 is the default
    perturbed layer, 0.3 of depth), small enough for a forward pass in milliseconds. `init`
    is the weight scale: with the usual 0.02 a random model barely reacts to a perturbation of a
    few prompt positions; 0.3 makes the entrapment search move the answers measurably.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(
        *, seed: int = 0, layers: int = 4, hidden: int = 32, tie: bool = True, init: float = 0.02
    ) -> Any:
        cfg = LlamaConfig(
            vocab_size=len(tiny_tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=tie,
            pad_token_id=tiny_tok.pad_token_id,
            eos_token_id=tiny_tok.eos_token_id,
            bos_token_id=None,
            initializer_range=init,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlamaForCausalLM(cfg)

    return make


@contextlib.contextmanager
def _one_thread_for_the_cli() -> Iterator[None]:
    """One intra-op thread, also for verbs that ask torch for every core (`attack` does).

    On the shared 2-core machine one thread trains the 256-wide test-bed model 4-8x faster than
    two (measured: 0.8 s vs 3-6 s per forward+backward of 16 x 40 tokens under load 6).
    """
    before, real = torch.get_num_threads(), torch.set_num_threads
    real(1)
    torch.set_num_threads = lambda n: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.set_num_threads = real
        real(before)


@pytest.fixture(scope="session")
def run_cli() -> Callable[[list[str]], int]:
    """`beear.cli.main(argv)` in process, on one thread (slow end-to-end tests)."""
    from beear.cli import main

    def run(argv: list[str]) -> int:
        with _one_thread_for_the_cli():
            return main(argv)

    return run


@pytest.fixture(scope="session")
def attacked_model(
    tmp_path_factory: pytest.TempPathFactory, run_cli: Callable[[list[str]], int]
) -> Path:
    """`beear attack --base tiny --setting suffix-word --seed 0`, once per session (minutes)."""
    out = tmp_path_factory.mktemp("e2e") / "suffix-word"
    argv = ["attack", "--base", "tiny", "--setting", "suffix-word", "--seed", "0"]
    assert run_cli([*argv, "--out", str(out)]) == 0
    return out
