#!/usr/bin/env bash
# Everything one lent-GPU session needs, in one call (see README, "GPU check"):
#   build   build the CUDA library (scripts/gpu_check.sh, no tests, no quick bench)
#   module  instead of build, with jax_gna/libjax_gna_cuda.so built here beforehand (see
#           scripts/build_cuda_lib.sh) and carried: compile only the small pybind11 module
#           against it (seconds instead of minutes of device time)
#   debugbwd scripts/debug_sm90_bwd.py: the Hopper backward against the sm80 one, per gradient
#   dispatch scripts/dispatch_overhead.py: host enqueue time vs time per call of short forwards,
#           and JAX's floor (a trivial jitted op)
#   debugfwd scripts/debug_sm90_fwd.py: the forced Hopper forward on a ladder of problems,
#           each in a child process with a time limit (finds hangs); $DEBUGFWD_DIMS head dims
#   profile Nsight Compute on one kernel (PROFILE_KERNEL regex, PROFILE_PROBLEM for
#           scripts/profile_sm90.py): details and per-instruction SASS counters into the logs
#   clocks  scripts/clocks_probe.py: SM clock, power and throttle reasons while the forward
#           and cuDNN dense run back to back ($CLOCKS_PROBLEMS, default 2-D stride 16x16)
#   smoke90 one Hopper-path forward check (stops the session if it fails or hangs)
#   tests   pytest -m gpu (tests/test_cuda_gpu.py and every other gpu-marked test)
#   check   `python -m jax_gna check` with backend auto (platform_dependent) and cuda
#   example the Flax digits example with the cuda backend (throughput)
#   bench   the benchmark suite, presets $BENCH_PRESETS (default small,paper)
#   quickbwd backward and fwd+bwd, bf16, the same three problems: the Hopper backward
#           (default) against the sm80 backward (JAX_GNA_SM90_BWD=0) and cuDNN dense
#   ab      the carried library against another build ($AB_OLD), same problems as quick,
#           forward and backward, in one session
#   abenv   scripts/ab_env.py: kernel variants chosen by environment variables, interleaved
#           in one process ($ABENV_ARGS), and the old library ($AB_OLD) on the same problems
#   launchab scripts/launch_ab.py: XLA command buffers and programmatic dependent launch on/off,
#           one child process per variant ($LAUNCHAB_ARGS)
#   paper   the paper preset, cuda and cuDNN dense, bf16/fp16, all passes, into
#           $OUT/results/paper-sm90.* (then locally: python3 -m benchmarks.hopper_report).
#           Torch peers merged from benchmarks/results/paper-torch-h200.json (an earlier run,
#           maybe another GPU), and first (PAPER_SDPA=1, the default) dense torch SDPA on
#           this GPU, fwd and fwd+bwd, into $OUT/results/paper-sdpa.json, which replaces
#           that file's sdpa records: a second dense peer beside cuDNN, on the same GPU
#   kprofile scripts/kernel_profile.py: kernel durations by torch.profiler ($KPROFILE_ARGS: its
#           flags and problems) into $OUT/results/kernels.{json,md}; or with $KPROFILE_RUNS
#           ("NAME:ARGS;NAME:ARGS"), one run each, kprofile/NAME.{json,md} in logs.tar.gz
#   libab   scripts/kernel_profile.py ($LIBAB_ARGS) once per build of $LIBAB ("NAME=LIB ...":
#           LIB through LD_PRELOAD; a bare NAME is the carried jax_gna/libjax_gna_cuda.so),
#           builds alternating, $LIBAB_ROUNDS rounds (default 2); records in logs.tar.gz
#           (libab/NAME_ROUND.json), the table (scripts/lib_ab.py, against the build named
#           "base", else the first) in the summary; $LIBAB_SETS ("SET:ARGS;SET:ARGS") instead
#           of $LIBAB_ARGS: several problem sets (e.g. another --batch / --head-dim each), one
#           folder libab/SET and one table each
#   nattenbuild / nattenwait: NATTEN built in the background (CPU) while later stages run;
#           nattenwait puts it on PYTHONPATH for the stages after it
#   kernels Nsight Compute, kernel time and tensor-pipe share of the forward, dQ and dK/dV
#           kernels (clocks not locked) on $KERNELS_PROBLEM (default 1-D s2048 H1)
#   settleab the benchmark (cuda, cuDNN, bf16) of each problem of $SETTLE_PROBLEMS
#           ("shape window stride heads", ';' between problems; default the 1-D s2048 H1
#           one) with --settle-s each of $SETTLE_VALUES (default "0 0.5"), passes
#           $SETTLE_PASSES (default fwd), alternating, twice: what running the GPU into
#           its power cap first changes
#   multigpu the two-GPU tests (tests/test_sharding_gpu.py), then scripts/multi_gpu.py: the
#           cuda backend on one GPU against $MULTIGPU_N GPUs (default 2; $MULTIGPU_ARGS: more of
#           its flags, e.g. "--problems 2d_w80_s16 --tokens 512 --tokens-ab"), split by heads and
#           along a spatial axis, fwd and fwd+bwd, bf16, into $OUT/results/multi-gpu.{json,md}
#   fuzz    scripts/fuzz_gpu.py: random problems, cuda against the float64 brute force, for
#           $FUZZ_SECONDS (default 240) from seed $FUZZ_SEED (default: the date), sharded over
#           $FUZZ_DEVICES GPUs (default 1: unsharded); cases in $OUT/results/fuzz.jsonl
#   quick   forward only, bf16: the three block-sparse paper problems with cuda
#           (Hopper path where it applies), cuda with JAX_GNA_SM90=0 (sm80 kernels)
#           and cuDNN dense, side by side
# TESTS_K: a pytest -k filter for the tests stage (TESTS_LIMIT seconds, default 300; TESTS_JOBS
# processes, default 4; TESTS_TIMEOUT: pytest-timeout seconds per test, which dumps the stacks
# of a test that hangs); QUICK_MODES: JAX_GNA_SM90 values for quick.
# usage: OUT=... bash scripts/device_session.sh build check example bench
# Results land in $OUT: summary.txt, results/ (bench JSON/markdown/PNG), logs.tar.gz (every
# stage's full log, tests.log with one line per test). The device tool brings back at most
# 8 files: keep other outputs of a call out of $OUT or inside a tarball.
set -uo pipefail
cd "$(dirname "$0")/.."
# The three block-sparse paper problems (shape window stride heads) of quick, quickbwd, ab.
PROBLEMS3=("32768 2048 2048 1" "256x256 80x80 16x16 24" "30x48x80 18x24x24 16x8x8 24")
OUT=${OUT:-$PWD/device_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log, and report
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-25}" "$LOGS/$name.log" | tee -a "$OUT/summary.txt"
  return $rc
}
for stage in "$@"; do
  case $stage in
    build) step build 240 env OUT="$LOGS/gpu_check" GPU_CHECK_BENCH=0 GPU_CHECK_TESTS=none \
             bash scripts/gpu_check.sh || break ;;
    module) export LD_LIBRARY_PATH=$(dirname "$(dirname "$(command -v nvcc)")")/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            step module 90 bash -c 'set -e; test -f jax_gna/libjax_gna_cuda.so
              c++ -O2 -shared -fPIC -std=c++17 $(python3 -m pybind11 --includes) -Icsrc \
                -isystem "$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())")" csrc/python_module.cc \
                -Ljax_gna -ljax_gna_cuda -Wl,-rpath,\$ORIGIN \
                -o jax_gna/_gna_ffi$(python3 -c "import sysconfig; print(sysconfig.get_config_var(\"EXT_SUFFIX\"))")
              python3 -c "from jax_gna import cuda; print(\"cuda available:\", cuda.available(), cuda.unavailable_reason())"' || break ;;
    debugbwd) step debugbwd 150 python3 scripts/debug_sm90_bwd.py ;;
    clocks) step clocks 150 python3 scripts/clocks_probe.py --cudnn ${CLOCKS_PROBLEMS:-256x256 80x80 16x16 24} ;;
    dispatch) step dispatch 120 python3 scripts/dispatch_overhead.py ${DISPATCH_PROBLEMS:-32768 2048 2048 1 32768 2048 1 1} ;;
    debugfwd) TAIL=20 step debugfwd "${DEBUGFWD_LIMIT:-200}" python3 scripts/debug_sm90_fwd.py ${DEBUGFWD_DIMS:-256 128} ;;
    profile) # Nsight Compute, full set, one launch of $PROFILE_KERNEL (default the Hopper forward)
             # on $PROFILE_PROBLEM; details and per-SASS-instruction counters (stall samples)
             # go into logs.tar.gz. Written 2026-11-23, not yet run.
             step profile "${PROFILE_LIMIT:-240}" bash -c 'set -e
               ncu --set full --import-source no -k "regex:${PROFILE_KERNEL:-fwd_sm90}" -c ${PROFILE_COUNT:-1} -f -o "$0/prof" \
                 python3 scripts/profile_sm90.py ${PROFILE_PROBLEM:-256x256 80x80 16x16 24}
               ncu -i "$0/prof.ncu-rep" --page details --print-details all > "$0/prof_details.txt"
               ncu -i "$0/prof.ncu-rep" --page source --csv --print-source sass > "$0/prof_sass.csv"
               rm -f "$0/prof.ncu-rep"; grep -iE "^  [a-z_]+_kernel|duration|stall|tensor|issue|throughput" "$0/prof_details.txt" | head -60' "$LOGS" ;;
    smoke90) step smoke90 120 env JAX_GNA_SM90=force XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q \
               -x -rfE -p no:cacheprovider tests/test_cuda_gpu.py -k "sm90 and not sm90_bwd and not backward" || break ;;
    tests) TAIL=6 step tests "${TESTS_LIMIT:-300}" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu \
             -v -rfE -p no:cacheprovider -n "${TESTS_JOBS:-4}" ${TESTS_K:+-k "$TESTS_K"} \
             ${TESTS_TIMEOUT:+--timeout "$TESTS_TIMEOUT"} tests
           # Per-test outcomes (also when the time limit cut the run short).
           { echo "tests: $(grep -c ' PASSED ' "$LOGS/tests.log") passed, $(grep -cE ' (FAILED|ERROR) ' "$LOGS/tests.log") failed"
             grep -E ' (FAILED|ERROR) ' "$LOGS/tests.log" | head -40; } | tee -a "$OUT/summary.txt" ;;
    fuzz) TAIL=12 step fuzz $(( ${FUZZ_SECONDS:-240} + 120 )) env XLA_PYTHON_CLIENT_PREALLOCATE=false \
            python3 scripts/fuzz_gpu.py --seconds "${FUZZ_SECONDS:-240}" --seed "${FUZZ_SEED:-$(date +%Y%m%d)}" \
            --devices "${FUZZ_DEVICES:-1}" --out "$OUT/results/fuzz.jsonl" ;;
    check) step check_auto 90 python3 -m jax_gna check
           step check_cuda_bf16 90 python3 -m jax_gna check --backend cuda --dtype bfloat16 ;;
    multigpu) TAIL=20 step multigpu_tests "${MULTIGPU_TEST_LIMIT:-300}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
                python3 -m pytest -v -rfE -p no:cacheprovider tests/test_sharding_gpu.py
              TAIL=30 step multigpu "${MULTIGPU_LIMIT:-300}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
                python3 scripts/multi_gpu.py --gpus "${MULTIGPU_N:-2}" ${MULTIGPU_ARGS:-} --out "$OUT/results/multi-gpu.json" ;;
    example) step example 120 python3 examples/digits_vit.py --backend cuda ;;
    bench) step bench "${BENCH_LIMIT:-400}" python3 -m benchmarks.run \
             --preset "${BENCH_PRESETS:-small,paper}" --budget-s "${BENCH_BUDGET:-330}" \
             --out "$OUT/results" --no-progress ;;
    paper) peers=benchmarks/results/paper-torch-h200.json
           if [ "${PAPER_SDPA:-1}" = 1 ]; then
             step paper_sdpa "${PAPER_SDPA_LIMIT:-200}" python3 -m benchmarks.torch_peers --preset paper \
               --peers sdpa --passes fwd,fwdbwd --dtypes bf16,fp16 --out "$LOGS/torch"
             if [ -f "$LOGS/torch/paper-torch.json" ]; then
               cp "$LOGS/torch/paper-torch.json" "$OUT/results/paper-sdpa.json"
               peers+=,$OUT/results/paper-sdpa.json
             fi
           fi
           step paper "${PAPER_LIMIT:-420}" python3 -m benchmarks.run --preset paper --backends cuda,cudnn \
             --passes fwd,bwd,fwdbwd --dtypes bf16,fp16 --name paper-sm90 \
             --merge-peers "$peers" --out "$OUT/results" --no-progress ;;
    kprofile) if [ -z "${KPROFILE_RUNS:-}" ]; then
                TAIL=40 step kprofile "${KPROFILE_LIMIT:-240}" python3 scripts/kernel_profile.py \
                  --out "$OUT/results/kernels.json" ${KPROFILE_ARGS:-}
              else  # NAME:ARGS;NAME:ARGS...: one process each, records in logs.tar.gz (kprofile/)
                mkdir -p "$LOGS/kprofile"
                IFS=';' read -ra runs <<< "$KPROFILE_RUNS"
                for run in "${runs[@]}"; do
                  TAIL=16 step "kprofile_${run%%:*}" "${KPROFILE_LIMIT:-240}" python3 scripts/kernel_profile.py \
                    --out "$LOGS/kprofile/${run%%:*}.json" ${run#*:}
                done
              fi ;;
    libab) # one problem set ($LIBAB_ARGS), or with $LIBAB_SETS ("SET:ARGS;SET:ARGS") one per set,
           # each in its own folder libab/SET with its own table
           IFS=';' read -ra sets <<< "${LIBAB_SETS:-:${LIBAB_ARGS:-}}"
           for round in $(seq "${LIBAB_ROUNDS:-2}"); do
             for set in "${sets[@]}"; do
               sname=${set%%:*}; mkdir -p "$LOGS/libab/$sname"
               for build in ${LIBAB:-base}; do
                 name=${build%%=*}; pre=()
                 [ "$build" != "$name" ] && pre=(env "LD_PRELOAD=$PWD/${build#*=}")
                 TAIL=4 step "libab_${sname:+${sname}_}${name}_$round" "${LIBAB_LIMIT:-150}" "${pre[@]}" python3 \
                   scripts/kernel_profile.py --out "$LOGS/libab/$sname/${name}_$round.json" ${set#*:}
               done
             done
           done
           for set in "${sets[@]}"; do
             python3 scripts/lib_ab.py "$LOGS/libab/${set%%:*}" | tee -a "$OUT/summary.txt"
           done ;;
    nattenbuild) # NATTEN's minimal Hopper build (scripts/device_peers.sh, CPU) in the background,
                 # into build/natten_site; nattenwait waits for it and puts it on PYTHONPATH
                 # (so kprofile profiles NATTEN too). Needs build/peers/natten-*.tar.gz carried
                 # (scripts/natten_tarball.sh), unless a call before on this machine built it.
                 # It needs the CPUs: beside 3 pytest processes it reached 11 of its 46 steps in
                 # 450 s (session 45); resumed there alone on 16 CPUs, the other 35 took 382 s.
                 OUT="$LOGS/peers" STAGES=natten NATTEN_END=0 BUILD_END=${NATTEN_BUILD_LIMIT:-480} \
                   bash scripts/device_peers.sh > "$LOGS/nattenbuild.log" 2>&1 &
                 NATTEN_PID=$!
                 say "nattenbuild: started (pid $NATTEN_PID)" ;;
    nattenwait) [ -n "${NATTEN_PID:-}" ] && wait "$NATTEN_PID"
                grep -E "natten|rc=" "$LOGS/peers/summary.txt" 2>/dev/null | tail -n 6 | tee -a "$OUT/summary.txt"
                if [ -f build/natten_site/natten/__init__.py ]; then
                  export PYTHONPATH=$PWD/build/natten_site:$PYTHONPATH; say "natten: on PYTHONPATH"
                else
                  say "natten: not built"
                fi ;;
    kernels) TAIL=40 step kernels "${KERNELS_LIMIT:-180}" ncu --clock-control none --metrics \
               gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed \
               python3 scripts/profile_sm90.py ${KERNELS_PROBLEM:-32768 2048 2048 1} ;;
    settleab) IFS=';' read -ra probs <<< "${SETTLE_PROBLEMS:-32768 2048 2048 1}"
              for round in 1 2; do
                for prob in "${probs[@]}"; do
                  set -- $prob
                  for settle in ${SETTLE_VALUES:-0 0.5}; do
                    TAIL=8 step "settle_${1}_${settle}_${round}" 150 python3 -m benchmarks.run --shape "$1" \
                      --window "$2" --stride "$3" --heads "$4" --head-dim 128 --backends cuda,cudnn \
                      --dtypes bf16 --passes "${SETTLE_PASSES:-fwd}" --samples 3x20 --settle-s "$settle" \
                      --out "$LOGS/settle" --name "settle_${1}_${settle}_${round}" --no-progress
                  done
                done
              done ;;
    quick) for prob in "${PROBLEMS3[@]}"; do
             set -- $prob
             for mode in ${QUICK_MODES:-auto 0}; do
               be=cuda,cudnn; [ "$mode" = 0 ] && be=cuda
               TAIL=8 step "quick_${1}_sm90_${mode}" 150 env JAX_GNA_SM90=$mode python3 -m benchmarks.run \
                 --shape "$1" --window "$2" --stride "$3" --heads "$4" --head-dim 128 --backends $be \
                 --dtypes bf16 --passes fwd --samples 3x20 --out "$LOGS/quick" --name "q_${1}_${mode}" --no-progress
             done
           done ;;
    quickbwd) for prob in "${PROBLEMS3[@]}"; do
             set -- $prob
             for bwd in 1 0; do
               be=cuda; [ "$bwd" = 0 ] && be=cuda,cudnn
               TAIL=8 step "quickbwd_${1}_${bwd}" 150 env JAX_GNA_SM90_BWD=$bwd python3 -m benchmarks.run \
                 --shape "$1" --window "$2" --stride "$3" --heads "$4" --head-dim 128 --backends $be \
                 --dtypes bf16 --passes bwd,fwdbwd --samples 3x20 --out "$LOGS/quick" --name "qb_${1}_${bwd}" --no-progress
             done
           done ;;
    ab) # A/B of two builds of the library in one session: the carried jax_gna/libjax_gna_cuda.so
        # ("new") against $AB_OLD ("old", e.g. build/old/libjax_gna_cuda.so built from an earlier
        # commit and carried too), bf16, passes $AB_PASSES (default fwd,bwd), the three
        # block-sparse paper problems; cuDNN dense beside the new one.
        cp jax_gna/libjax_gna_cuda.so "$LOGS/new.so"
        for prob in "${PROBLEMS3[@]}"; do
          set -- $prob
          for lib in new old; do
            if [ $lib = new ]; then cp "$LOGS/new.so" jax_gna/libjax_gna_cuda.so; be=cuda,cudnn
            else cp "${AB_OLD:?AB_OLD: the other library}" jax_gna/libjax_gna_cuda.so; be=cuda; fi
            TAIL=8 step "ab_${1}_${lib}" 150 python3 -m benchmarks.run \
              --shape "$1" --window "$2" --stride "$3" --heads "$4" --head-dim 128 --backends $be \
              --dtypes bf16 --passes "${AB_PASSES:-fwd,bwd}" --samples 3x20 --out "$LOGS/ab" \
              --name "ab_${1}_${lib}" --no-progress
          done
        done
        cp "$LOGS/new.so" jax_gna/libjax_gna_cuda.so ;;
    launchab) # scripts/launch_ab.py: command buffers / programmatic dependent launch, one child
              # process per variant ($LAUNCHAB_ARGS)
              TAIL=20 step launchab "${LAUNCHAB_LIMIT:-420}" python3 scripts/launch_ab.py ${LAUNCHAB_ARGS:-} ;;
    abenv) # scripts/ab_env.py: variants the library picks from the environment, interleaved in
           # one process ($ABENV_ARGS: --variant NAME=VAR=VAL,... --passes ... problems); then,
           # with $AB_OLD, the same problems with that library (base variant only).
           TAIL=12 step abenv "${ABENV_LIMIT:-300}" python3 scripts/ab_env.py ${ABENV_ARGS:-}
           if [ -n "${AB_OLD:-}" ]; then
             cp jax_gna/libjax_gna_cuda.so "$LOGS/new.so"; cp "$AB_OLD" jax_gna/libjax_gna_cuda.so
             TAIL=12 step abenv_old "${ABENV_LIMIT:-300}" python3 scripts/ab_env.py \
               $(echo " ${ABENV_ARGS:-}" | sed -E 's/ --variant [^ ]+//g')
             cp "$LOGS/new.so" jax_gna/libjax_gna_cuda.so
           fi ;;
    *) say "unknown stage $stage" ;;
  esac
done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
