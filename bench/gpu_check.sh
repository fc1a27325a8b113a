#!/usr/bin/env bash
# The project's GPU checks in one prepared run (the lent device machine; never needed by the tests):
# forward pass, 3-scale extraction, training throughput (fp32 / bf16), and a torchrun + NCCL training run.
#   OUT=/some/dir bash bench/gpu_check.sh       (results as JSON files under $OUT, logs on stdout)
set -u
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
OUT=${OUT:-bench/_out}
mkdir -p "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }
step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
step model_forward
timeout 120 python bench/model_forward.py --device cuda --repeats 10 --json "$OUT/model_forward_gpu.json"
step extract
timeout 150 python bench/extract.py --device cuda --n 48 --batch-size 8 --workers 8 --threads 8 --json "$OUT/extract_gpu.json"
step train fp32
timeout 120 python bench/train.py --json "$OUT/train_gpu_fp32.json"
step train bf16
timeout 120 python bench/train.py --amp bf16 --json "$OUT/train_gpu_bf16.json"
step torchrun nccl
python -c "import synthetic_landmarks as s; s.write_class_folders('/tmp/syn', 24, 6, size=96)"
timeout 150 torchrun --standalone --nproc_per_node=1 -m tokenret.cli train --config configs/tiny_cpu.yaml \
  data.root=/tmp/syn train.device=cuda train.epochs=2 train.amp=bf16 train.output_dir=/tmp/run_nccl \
  2>&1 | tail -25
ls -la /tmp/run_nccl | head
cp /tmp/run_nccl/*.jsonl "$OUT/" 2>/dev/null
step done
