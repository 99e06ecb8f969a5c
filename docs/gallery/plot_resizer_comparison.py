"""
The learnable resizer beside bilinear enlargement (seed 003)
============================================================

Seed 003 puts :class:`dilconv.LearnableResizer` with CBAM (Talebi & Milanfar, ICCV 2021; Woo et
al., ECCV 2018) in front of a VGG16 and shows, in its figure 8, what the resizer makes of a
small image beside plain bilinear enlargement. Here the same figure comes from a model trained
for **a few seconds** on the CPU: ``vgg_tiny`` (VGG16's layout at 1/8 width) behind a
Resizer_CBAM enlarging scikit-learn's 8x8 digits to 32x32, two epochs on 512 of them with the
study's recipe but AdamW (:func:`examples.resizer_classifier.demo.run_table1`, the code behind
``make demo``'s seed-003 table). The study's own figure comes from 300 epochs on CIFAR-10
(32 -> 224) with an ImageNet VGG16; see :doc:`/studies/seed003`.
"""

import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from examples.resizer_classifier.data import IMAGENET_MEAN, IMAGENET_STD, build_datasets
from examples.resizer_classifier.demo import CONFIGS, run_table1
from examples.resizer_classifier.figure import resizer_figure
from examples.resizer_classifier.train import recipe_config

out = Path(tempfile.mkdtemp(prefix="dilconv-gallery-"))
cbam = [c for c in CONFIGS if c[1] == "vgg16_resizer_cbam" and not c[2]]
start = time.perf_counter()
rows, model = run_table1(out, epochs=2, limit=512, configs=cbam)
print(f"{rows[0]['title']}: test accuracy {rows[0]['test_acc']:.1%} after "
      f"{time.perf_counter() - start:.0f} s ({rows[0]['parameters']:,} parameters)")

# %%
# Figure 8 for six test digits: bilinear (top), the resizer (middle), their difference
# (bottom, each image scaled to its own maximum).
config = recipe_config("vgg16_resizer_cbam", out, dataset="digits", image_size=8)
_, test, classes = build_datasets(config)
pairs = [test[i] for i in range(6)]
images = torch.stack([image for image, _ in pairs])
path = resizer_figure(model, images, out / "figure8.png", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      titles=[f"digit {classes[int(y)]}" for _, y in pairs])
fig, ax = plt.subplots(figsize=(12, 6.6), layout="constrained")
ax.imshow(plt.imread(path))
ax.set_axis_off()
plt.show()
