#!/usr/bin/env bash
# The device checks of one GPU session, in one go (about 8-10 minutes on an H100/H200, not yet timed): the CUDA
# tests (mask invariants, bf16 forward, alignment's bf16 teacher, depth), a one-GPU engine run (with the k-NN
# monitor), the price of a ViT-B alignment teacher, and the benchmarks' tables.
# Run from the repository root on the GPU machine, with this package importable (PYTHONPATH=.) and its
# dependencies present; the lent machines' image lacks pydantic: carry its wheels (benchmarks/README.md).
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
echo "== CUDA tests =="
python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_model.py 2>&1 | tail -3
echo "== engine on one GPU: tiny synthetic dataset, bf16, 3 epochs, the k-NN monitor on a quarter held out =="
python3 - <<'PY'
from pathlib import Path
import sys
sys.path.insert(0, "tests")
from conftest import make_dataset, TINY_OVERRIDES
make_dataset(Path("/tmp/gpu-data"), n_per_class=32)
Path("/tmp/gpu-sets").write_text(" ".join(f"--set {x}" for x in TINY_OVERRIDES if "num_workers" not in x))
PY
python3 -m cfmae_cli pretrain --gpus 1 --data /tmp/gpu-data --out "$OUT/run" --epochs 3 $(cat /tmp/gpu-sets) \
    --set train.batch_size=16 --set optim.effective_batch=16 --set train.monitor.val_fraction=0.25 \
    --set train.monitor.every=1 2>&1 | tail -4
echo "== feature alignment and depth on the GPU: bf16 teacher, tests; the price of a ViT-B teacher =="
python3 -m pytest -q -p no:cacheprovider tests/test_align.py tests/test_depth.py -k "not label" 2>&1 | tail -3
python3 -c "import timm, safetensors.torch as s; s.save_file(timm.create_model('vit_base_patch16_224', \
num_classes=0).state_dict(), '/tmp/vitb-teacher.safetensors')"
python3 -m cfmae_cli bench --preset vitb-400e --compare vitb-400e --what step --batch-size 128 --steps 10 \
    --warmup 3 --out "$OUT/bench-align.json" --set model.align.enabled=true \
    --set model.align.teacher=vit_base_patch16_224 --set model.align.weights=/tmp/vitb-teacher.safetensors \
    2>&1 | tail -24
echo "== masks vs step (ViT-B) =="
python3 benchmarks/bench_masking.py --device cuda 2>&1 | tail -16
echo "== vitb-400e pre-training throughput, 300 steps, batch 256 =="
python3 benchmarks/bench_pretrain.py --steps 300 --batch 256 2>&1 | tail -12
echo "== the k-NN monitor vs an epoch (demo on the GPU; ViT-B forward timed) =="
python3 benchmarks/bench_monitor.py --device cuda --epochs 2 2>&1 | tail -8
echo "== labelling stages, full-size random-weight models =="
python3 benchmarks/bench_label.py --full-size --device cuda --images 32 2>&1 | tail -12
