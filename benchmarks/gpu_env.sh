# Sourced first by every benchmarks/gpu_*.sh on a lent GPU (see ../shared/gpu/README.md): installs the
# carried wheels, starts Redis, builds the random-weight models, and points inferq at them.
source .gpu/setup.sh || return 1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 INFERQ_REDIS_URL=redis://127.0.0.1:6379/0
# Random-weight copies of the default models, built by setup.sh from their real configs.
export INFERQ_MODELS__EMBED='{"minilm": {"source": "/tmp/models/minilm", "max_length": 256}}'
export INFERQ_MODELS__GENERATE='{"smollm2": {"source": "/tmp/models/smollm2", "max_length": 2048}}'
out=${OUT:-/tmp/out}; mkdir -p "$out"
