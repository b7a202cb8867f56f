#!/usr/bin/env bash
# Install everything and run the whole test suite, from a clean clone:
#   bash scripts/test.sh
# 1. a virtual environment in .venv with the exact pins of requirements.txt and lora_edu;
# 2. Debian's chromium for the browser test (installed with apt-get when run as root);
# 3. the web book, built into _build/html (the browser test reads it);
# 4. pytest: unit and parity tests, strict nbval on every notebook, the browser test;
# 5. strict nbval on every notebook once more, and the re-runs of chapters 2 and 5's stored sweeps,
#    on other CPU code paths: ATen's portable kernels instead of AVX2/AVX-512
#    (ATEN_CPU_CAPABILITY=default), MKL's reproducible-across-CPUs mode (MKL_CBWR=COMPATIBLE)
#    and one thread. Each moves figures that went through a training loop on this machine, as
#    another CPU would; stored outputs must hold under both passes.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build_book.sh  # also creates .venv and installs requirements.txt and lora_edu

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "== installing Debian's chromium for the browser test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "The browser test needs Debian's chromium: run 'sudo apt-get install chromium', then this script again." >&2
    exit 1
  fi
fi

NBVAL=(--nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider -n 2 --dist loadscope)

echo "== running the tests"
.venv/bin/python -m pytest tests notebooks book "${NBVAL[@]}" -rs "$@"

echo "== the notebooks and the stored sweeps again, on other CPU code paths"
ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  .venv/bin/python -m pytest notebooks book tests/test_scaling.py::test_committed_sweeps_equal_a_quick_rerun \
  tests/test_dora_sweeps.py::test_committed_dora_sweeps_equal_a_quick_rerun \
  "${NBVAL[@]}" -q
