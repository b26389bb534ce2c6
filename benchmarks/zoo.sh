#!/usr/bin/env bash
# The commands that produce the weights shipped in src/dynnet/zoo/weights/ (each manifest records its own command,
# data, seed, test accuracy, date, machine and sha256). Resumable: run again after an interruption.
# On 2 CPU cores: the ResNet-20 base takes about 80 min (1 thread), width 0.71 about 75 min, width 0.5 about 35 min
# (the little network of the main job's network selection, and the static baseline at a quarter of the MACs), the
# pruned baseline 3 min.
set -euo pipefail
cd "$(dirname "$0")/.."
DYNNET=.venv/bin/dynnet

# The dense base the defaults fine-tune from (ResNet-20, Fashion-MNIST, 20 epochs, augmented).
$DYNNET pretrain --model cifar_resnet20 --data fashion_mnist --epochs 20 --threads 1 \
    --out runs/pretrain/cifar_resnet20-fashion_mnist-e20

# The narrower static network of the same schedule at half the MACs (width 0.71: 0.494 of the base's MACs at
# 28x28), trained from scratch like the base (about 75 min on 1 thread).
$DYNNET pretrain --model cifar_resnet20 --width 0.71 --data fashion_mnist --epochs 20 --threads 1 \
    --out runs/pretrain/cifar_resnet20x0.71-fashion_mnist-e20

# Width 0.5 (0.251 of the base's MACs), the same schedule: the static baseline at a quarter of the MACs and the little
# network of the main job's network selection.
$DYNNET pretrain --model cifar_resnet20 --width 0.5 --data fashion_mnist --epochs 20 --threads 1 \
    --out runs/pretrain/cifar_resnet20x0.5-fashion_mnist-e20

# The static baseline of the main job: the base pruned to half its MACs (lowest-L1 channels) and fine-tuned with
# exactly the quickstart's fine-tuning schedule (1 epoch of its 30,000-image subset, lr 0.02, distilled).
[ -f runs/prune/cifar_resnet20p0.5-fashion_mnist/manifest.json ] || $DYNNET prune --init runs/pretrain/cifar_resnet20-fashion_mnist-e20 --macs 0.5 --epochs 1 --lr 0.02 \
    --distill 1.0 --subset 30000 --out runs/prune/cifar_resnet20p0.5-fashion_mnist

.venv/bin/python - <<'PY'
import dynnet.zoo as zoo

for run in ("runs/pretrain/cifar_resnet20-fashion_mnist-e20", "runs/pretrain/cifar_resnet20x0.71-fashion_mnist-e20",
            "runs/pretrain/cifar_resnet20x0.5-fashion_mnist-e20", "runs/prune/cifar_resnet20p0.5-fashion_mnist"):
    print("shipped", zoo.ship(run, force=True))
PY
