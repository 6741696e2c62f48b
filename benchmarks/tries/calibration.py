"""Throw-away try behind docs/results.md (why SAL's evaluation loss is high): the MNIST test
loss of a SAL-16 and a BP classifier split between right and wrong predictions, with the
logits' spread and the confidence of each. Train the two first (3 epochs, recipe defaults):

    accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 1 \
        recipes/train_classifier.py --dataset mnist --method sal --num_areas 16 \
        --num_train_epochs 3 --output_dir /tmp/cal/sal
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 1 \
        recipes/train_classifier.py --dataset mnist --method bp --num_train_epochs 3 \
        --output_dir /tmp/cal/bp
    python benchmarks/tries/calibration.py /tmp/cal

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, torch, numpy as np
torch.set_num_threads(1)
from sal_hf import AutoSALModelForImageClassification
from sal_hf.data import load_image_dataset
root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cal"
ds = load_image_dataset("mnist")["test"].with_format("torch")
x = torch.as_tensor(np.array(ds["pixel_values"][:]), dtype=torch.float32)
y = torch.as_tensor(np.array(ds["labels"][:]))
for m in ("sal", "bp"):
    model = AutoSALModelForImageClassification.from_pretrained(f"{root}/{m}").eval()
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    p = logits.softmax(-1); pred = p.argmax(-1); wrong = pred != y
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    conf = p.max(-1).values
    print(m, f"acc {1-wrong.float().mean():.4f} loss {nll.mean():.3f}",
          f"loss(right) {nll[~wrong].mean():.4f} loss(wrong) {nll[wrong].mean():.2f}",
          f"share of loss from wrong {nll[wrong].sum()/nll.sum():.2f}",
          f"logit std {logits.std(-1).mean():.1f} conf(wrong) {conf[wrong].mean():.3f}",
          f"conf(right) {conf[~wrong].mean():.4f}")
