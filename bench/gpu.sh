#!/usr/bin/env bash
# Every GPU check in one prepared run: correctness first, then the side-by-side timings.
#
#   bash bench/gpu.sh OUTDIR [PART ...]      PARTs: tests sanitize kernels scripts train generate dpo (default: all)
#
# Each part has its own time limit and writes OUTDIR/<part>.txt; a part that fails or runs out of time does
# not stop the others. All parts together take over 10 minutes on an H200: name the parts a check needs (the
# kernels: tests sanitize kernels; the scripts end to end under FSDP2, eager and compiled, CUDA-graph decoding
# and the eval CLI: scripts, alone, as its torch.compile runs take minutes). tests and sanitize skip
# tests/conftest.py (the kernel tests need no transformers). sanitize runs the kernel tests' "tiny" cases under compute-sanitizer's
# memcheck (out-of-bounds or misaligned accesses, which the Triton interpreter does not catch) and racecheck
# (shared-memory races); the tool refuses some virtualised GPUs ("Device not supported"), which the part
# reports. The tables of bench/kernels.py also go to OUTDIR/kernels.md (+ .json). Liger-Kernel and Cut
# Cross-Entropy join the kernel table when importable: wheels placed in .whl/ are installed first. The tests
# need transformers < 5.25 (later ones need the `kernels` package, whose name is this project's kernels/; see
# tests/conftest.py): on a machine with a later one, put that wheel in .whl/ too
# (python3 -m pip download --no-deps "transformers<5.25" liger-kernel cut-cross-entropy -d .whl).
set -u
out=${1:?usage: bash bench/gpu.sh OUTDIR [PART ...]}
shift
parts=${*:-tests sanitize kernels scripts train generate dpo}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps .whl/*.whl
pip uninstall -y -q kernels 2>/dev/null  # transformers < 5.25 runs without it; ours has its name
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
           torch.cuda.get_device_name())" | tee "$out/versions.txt"

run() {  # run PART LIMIT_S COMMAND...: the command's output to OUTDIR/PART.txt, a one-line verdict here
    local part=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$out/$part.txt" 2>&1
    local rc=$?
    echo "== $part: rc=$rc in $((SECONDS - t0)) s | $(grep -E 'passed|failed|error' "$out/$part.txt" | tail -n 1)"
}
for part in $parts; do
    case $part in
        tests) run tests 300 python -m pytest -q -rs --noconftest tests/test_kernels_gpu.py ;;
        scripts) run scripts 560 python -m pytest -q -rs tests/test_generate.py::test_cuda_graph_equals_eager \
                     tests/test_eval.py::test_cli_cuda tests/test_scripts_gpu.py ;;
        sanitize) run sanitize 240 bash -c 'for tool in memcheck racecheck; do
                      compute-sanitizer --tool $tool --error-exitcode 1 \
                          python -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels_gpu.py -k tiny || exit 1
                  done' ;;
        kernels) run kernels 240 python bench/kernels.py --budget-s 200 --out "$out/kernels.md" ;;
        train) run train 240 python bench/train.py --gpu ;;
        generate) run generate 180 python bench/generate.py ;;
        dpo) run dpo 120 python bench/dpo.py ;;
        *) echo "unknown part $part (tests sanitize kernels scripts train generate dpo)"; exit 2 ;;
    esac
done
