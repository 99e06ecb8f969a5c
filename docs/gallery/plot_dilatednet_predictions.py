"""
Segmentation after a short run (seed 002)
=========================================

Yu & Koltun's DilatedNet as ``examples/dilatednet`` rebuilds it: VGG16's layout without pool4
and pool5, conv5 dilated 2, fc6 as a 7x7 convolution dilated 4, class scores at 1/8 of the
input, bilinear up-sampling. Here it is narrow (``--width 4``: conv1 has 4 channels instead of
64; fc6/fc7 have 32 instead of 4096) and trained for **a few seconds** on the CPU from random
weights, on a folder of generated images with one red and one green rectangle each, written
in the layout the training script reads for your own data (``images/`` and ``masks/`` of class
indices). Then stage 2 of the paper puts the identity-initialised basic context module
(:class:`dilconv.ContextModule`) on top (:meth:`DilatedNet.add_context
<examples.dilatednet.models.DilatedNet.add_context>`): before any training it predicts nearly
what the front-end predicts (its ReLUs clip negative scores, so not exactly). The paper's
figures need Pascal VOC 2012 and an ImageNet VGG16; see :doc:`/studies/seed002`.
"""

import json
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from examples.dilatednet import train
from examples.dilatednet.data import (
    RECTANGLE_CLASSES,
    build_segmentation_datasets,
    rectangles,
    write_segmentation_folder,
)
from examples.dilatednet.demo import draw_predictions
from examples.dilatednet.models import DilatedNet

CLASSES = RECTANGLE_CLASSES
SIZE = 48

root = Path(tempfile.mkdtemp(prefix="dilconv-gallery-"))
write_segmentation_folder(rectangles(64, SIZE, seed=1), root / "data" / "train", CLASSES)
write_segmentation_folder(rectangles(16, SIZE, seed=2), root / "data" / "val", CLASSES)
(root / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
print(sorted(str(p.relative_to(root / "data")) for p in (root / "data").glob("**/*")
             if not p.name.startswith("0000")))

# %%
# Stage 1, the front-end: the same flags as
# ``python -m examples.dilatednet.train --data ROOT --width 4 ...`` on the command line.
start = time.perf_counter()
status = train.main(["--data", str(root / "data"), "--image-size", str(SIZE), "--width", "4",
                     "--fc-channels", "32", "--dropout", "0", "--optimizer", "adamw",
                     "--lr", "3e-3", "--batch-size", "8", "--epochs", "30", "--device", "cpu",
                     "--out", str(root / "frontend"), "--quiet"])
assert status == 0, "training failed"
final = json.loads((root / "frontend" / "metrics.json").read_text())["final"]
print(f"front-end trained for {time.perf_counter() - start:.0f} s: best mIoU "
      f"{final['best_miou']:.3f}")

# %%
# The best epoch's front-end, and the network at the start of stage 2, on four validation
# images.
frontend = DilatedNet(len(CLASSES), width=4, fc_channels=32, dropout=0.0)
best = torch.load(root / "frontend" / "best.pt", weights_only=True)
frontend.load_state_dict(best["model_state"])
torch.manual_seed(0)
with_context = frontend.add_context("basic")
_, val, _ = build_segmentation_datasets("folder", root / "data", SIZE, None, 0)
path = draw_predictions({"front-end": frontend, "+ basic context (start)": with_context},
                        [val[i] for i in range(4)], root / "predictions.png", CLASSES)
fig, ax = plt.subplots(figsize=(6, 7), layout="constrained")
ax.imshow(plt.imread(path))
ax.set_axis_off()
plt.show()
