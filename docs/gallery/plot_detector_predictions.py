"""
Detector predictions after a short run (seed 001)
=================================================

Seed 001's detector, as ``examples/detector_neck`` rebuilds it: an EfficientNet taken at the
deepest feature of strides 8, 16 and 32, one of the study's necks (here the BiFPN with P6/P7,
:class:`dilconv.BiFPN` with ``num_levels=5``) and torchvision's SSD head. It is trained here for
**a few seconds** on the CPU, from random weights, on digits pasted onto 64x64 canvases, with
``efficientnet_tiny`` (b0's stages at half width and depth) instead of b4: the same command as
``python -m examples.detector_neck.train`` with tiny settings. Expect boxes that are mostly
wrong: SSD needs far more steps than a page build allows (``make demo`` trains 10 epochs on 256
canvases and reaches an mAP@0.5 of about 0.1). The point is the pipeline (data, neck, head,
metric, drawing), not the accuracy. The study's own setting
(pedestrian images at 512x640, EfficientNet-b4) needs its data set and a GPU; see
:doc:`/studies/seed001`.
"""

import json
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from examples.detector_neck import train
from examples.detector_neck.data import CANVAS_CLASSES, DigitsCanvas, detection_transforms
from examples.detector_neck.demo import draw_detections
from examples.detector_neck.models import build_ssd

SIZE = 64
NECK = "fpn_transposed"
torch.manual_seed(0)
out = Path(tempfile.mkdtemp(prefix="dilconv-gallery-"))
start = time.perf_counter()
status = train.main(["--neck", NECK, "--dataset", "digits-canvas", "--backbone",
                     "efficientnet_tiny", "--image-size", str(SIZE), "--batch-size", "16",
                     "--lr", "3e-3", "--limit", "96", "--epochs", "3", "--device", "cpu",
                     "--out", str(out), "--quiet"])
assert status == 0, "training failed"
metrics = json.loads((out / "metrics.json").read_text())
print(f"trained {NECK} for {time.perf_counter() - start:.0f} s: "
      f"mAP@0.5 {metrics['final']['best_map50']:.3f} on {metrics['test_samples']} val canvases")

# %%
# The best epoch's weights (``best.pt``, written by the harness) on four validation canvases:
# ground truth in green, the best-scored predictions (one per object) in red.
model = build_ssd(NECK, len(CANVAS_CLASSES), (SIZE, SIZE), "efficientnet_tiny")
model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model_state"])
val = DigitsCanvas("val", count=4, transforms=detection_transforms((SIZE, SIZE), train=False))
images, targets = zip(*(val[i] for i in range(4)))
path = draw_detections(model, list(images), list(targets), out / "detections.png")

fig, ax = plt.subplots(figsize=(10.4, 2.9), layout="constrained")
ax.imshow(plt.imread(path))
ax.set_axis_off()
plt.show()
