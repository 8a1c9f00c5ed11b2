#!/usr/bin/env bash
# Issue 8's device check in one go (about 6-8 minutes on an H100/H200): `cfmae bench` for vitb-400e beside
# mae-vitb at batch 256, eager and then compiled, and the data path with 1, 8 and 16 workers.
# Run from the repository root on the GPU machine with this package importable and its dependencies present
# (the lent machines' image lacks pydantic: carry its wheels, benchmarks/README.md). Tables go to stdout, the
# JSON files to $OUT.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/gpu-bench}"; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
echo "== eager: vitb-400e vs mae-vitb, batch 256, 30 steps =="
timeout 240 python3 -m cfmae_cli bench --device cuda --batch-size 256 --steps 30 --warmup 10 --what step \
    --out "$OUT/eager.json" 2>&1 | tail -30
echo "== compiled (train.compile): the same =="
timeout 300 python3 -m cfmae_cli bench --device cuda --batch-size 256 --steps 30 --warmup 10 --what step \
    --compile --out "$OUT/compiled.json" 2>&1 | tail -30
echo "== masks at batch 256, and the data path (ImageNet-sized JPEG + 2 PNG maps, folder and packed) =="
timeout 120 python3 -m cfmae_cli bench --device cuda --what masks --mask-batch 256 --compare none \
    --out "$OUT/masks.json" 2>&1 | tail -4
timeout 120 python3 -m cfmae_cli bench --device cuda --what data --workers 1,8,16 --compare none \
    --out "$OUT/data.json" 2>&1 | tail -7
