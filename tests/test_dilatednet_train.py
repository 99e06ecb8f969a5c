"""DilatedNet's train script and demo: learning, stage 2 from a front-end, resume, refusals,
torchrun.

Learning is tested on a folder of colour-coded rectangles: they are wide enough for a network
that scores at 1/8 of the input and learnable in a few hundred steps. Digit canvases are not, at
test sizes: at 48x48 even the best prediction a stride-8 network can up-sample (the masks
average-pooled by 8) scores mIoU 0.22 against 0.08 for background everywhere, and a narrow
front-end trained from scratch predicted its first non-background pixel on the val canvases
only after 600-1100 steps (64-96 px, batch 4-8, width 4-8: 25 s and more on one core). The
refusals and the demo run on digit canvases.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from examples.dilatednet import demo, train
from examples.dilatednet.data import (
    CANVAS_CLASSES,
    IGNORE_INDEX,
    RECTANGLE_CLASSES,
    build_segmentation_datasets,
    rectangles,
    write_segmentation_folder,
)
from examples.dilatednet.models import DilatedNet
from examples.harness import TrainConfig
from examples.harness.checkpoint import FORMAT
from examples.harness.distributed import Dist
from examples.harness.loop import _Step, evaluate, train_one_epoch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassJaccardIndex
from tqdm import tqdm

from run_helpers import REPO, subprocess_env

CLASSES = RECTANGLE_CLASSES
SIZE = 48
WIDTH, FC = 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_segmentation_folder(rectangles(64, SIZE, seed=1), root / "train", CLASSES)
    write_segmentation_folder(rectangles(16, SIZE, seed=2), root / "val", CLASSES)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def _flags(data: Path, out: Path, *extra: str, epochs: int) -> list[str]:
    return ["--data", str(data), "--image-size", str(SIZE), "--dropout", "0", "--optimizer",
            "adamw", "--lr", "3e-3", "--batch-size", "4", "--epochs", str(epochs), "--out",
            str(out), "--device", "cpu", "--workers", "0", "--quiet", *extra]


def _val(shapes: Path) -> tuple[Tensor, Tensor]:
    _, val, _ = build_segmentation_datasets("folder", shapes, SIZE, None, 0)
    images, masks = zip(*(val[i] for i in range(len(val))), strict=True)
    return torch.stack(images), torch.stack(masks)


def _miou(predicted: Tensor, masks: Tensor) -> float:
    iou = MulticlassJaccardIndex(len(CLASSES), ignore_index=IGNORE_INDEX)
    iou.update(predicted, masks)
    return float(iou.compute())


@pytest.fixture(scope="module")
def frontend_run(shapes, tmp_path_factory) -> Path:
    """A front-end trained 20 epochs on the rectangles (its output folder)."""
    out = tmp_path_factory.mktemp("frontend")
    torch.set_num_threads(1)
    flags = _flags(shapes, out, "--width", str(WIDTH), "--fc-channels", str(FC), epochs=20)
    assert train.main(flags) == 0
    return out


@pytest.fixture(scope="module")
def stage2_run(shapes, frontend_run, tmp_path_factory) -> Path:
    """Stage 2: the basic context module on ``frontend_run``'s best.pt, trained 2 epochs."""
    out = tmp_path_factory.mktemp("basic")
    torch.set_num_threads(1)
    flags = _flags(shapes, out, "--context", "basic", "--init-from",
                   str(frontend_run / "best.pt"), epochs=2)
    assert train.main(flags) == 0
    return out


@pytest.mark.slow
def test_frontend_learns_more_than_background(frontend_run, shapes):
    _, masks = _val(shapes)
    background = _miou(torch.zeros_like(masks), masks)
    metrics = json.loads((frontend_run / "metrics.json").read_text())
    assert metrics["model"] == "none" and metrics["task"] == "segmentation"
    assert metrics["config"]["options"]["width"] == WIDTH
    assert metrics["final"]["best_miou"] > background + 0.1, (metrics["final"], background)
    assert sorted(p.name for p in frontend_run.iterdir()) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.json"]


@pytest.mark.slow
def test_stage2_starts_from_the_frontend_with_relu_clipped_scores(stage2_run, frontend_run,
                                                                  shapes):
    report = json.loads((stage2_run / train.STAGE2_REPORT).read_text())
    best = torch.load(frontend_run / "best.pt", weights_only=True)
    assert report["context"] == "basic" and report["init_from"] == str(frontend_run / "best.pt")
    # the front-end scores what it scored when best.pt was written: same weights, same val data
    assert report["frontend"]["miou"] == pytest.approx(best["best"]["miou"], abs=1e-6)
    # identity-initialised basic context = relu of the front-end's scores, then up-sampling
    net = DilatedNet(len(CLASSES), width=WIDTH, fc_channels=FC).eval()
    net.load_state_dict(best["model_state"])
    images, masks = _val(shapes)
    with torch.no_grad():
        plain = net(images).argmax(1)
        clipped = F.interpolate(net.forward_frontend(images).relu(), scale_factor=8,
                                mode="bilinear", align_corners=False).argmax(1)
    assert report["stage2_start"]["miou"] == pytest.approx(_miou(clipped, masks), abs=1e-3)
    changed = (plain != clipped).double().mean().item()
    assert report["changed_pixels"] == pytest.approx(changed, abs=1e-3)
    difference = report["stage2_start"]["miou"] - report["frontend"]["miou"]
    assert report["difference"]["miou"] == pytest.approx(difference)
    metrics = json.loads((stage2_run / "metrics.json").read_text())
    assert metrics["model"] == "basic" and [h["epoch"] for h in metrics["history"]] == [1, 2]
    state = torch.load(stage2_run / "checkpoint.pt", weights_only=True)["model_state"]
    assert {k.split(".")[0] for k in state} == {"frontend", "context"}


@pytest.mark.slow
def test_resume_after_a_finished_run_trains_nothing(stage2_run, frontend_run, shapes, capsys):
    files = {name: (stage2_run / name).read_bytes()
             for name in ("checkpoint.pt", "best.pt", train.STAGE2_REPORT)}
    history = json.loads((stage2_run / "metrics.json").read_text())["history"]
    flags = _flags(shapes, stage2_run, "--context", "basic", "--init-from",
                   str(frontend_run / "best.pt"), "--resume", epochs=2)
    flags.remove("--quiet")
    assert train.main(flags) == 0
    assert json.loads((stage2_run / "metrics.json").read_text())["history"] == history
    assert {name: (stage2_run / name).read_bytes() for name in files} == files
    out = capsys.readouterr().out
    assert "epoch" not in out.replace("after epoch 2 of 2", "") and "start of stage 2" not in out


@pytest.mark.slow
def test_resume_refuses_another_context(stage2_run, frontend_run, shapes, capsys):
    flags = _flags(shapes, stage2_run, "--context", "large", "--init-from",
                   str(frontend_run / "best.pt"), "--resume", epochs=2)
    assert train.main(flags) == 2
    err = capsys.readouterr().err
    assert "model 'basic'" in err and "'large'" in err and str(stage2_run) in err


def _fake_checkpoint(path: Path, *, model: str = "none", num_classes: int = len(CANVAS_CLASSES),
                     width: int = 2, prefix: str = "") -> Path:
    net = DilatedNet(num_classes, width=width, fc_channels=8)
    weights = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save({"format": FORMAT, "model": model, "num_classes": num_classes,
                "model_state": weights}, path)
    return path


def _canvas_flags(out: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits-canvas", "--image-size", "32", "--limit", "4", "--epochs", "1",
            "--out", str(out), "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize(("case", "context", "expected"), [
    ("missing", "basic", "no such file"),
    ("garbage", "basic", "cannot be read"),
    ("state_dict", "basic", "is not a checkpoint of these train scripts"),
    ("stage2", "large", "is a stage-2 checkpoint (--context basic)"),
    ("classifier", "basic", "is a checkpoint of model 'resnet50'"),
    ("classes", "basic", "scores 3 classes, but this run's data has 11"),
    ("width", "basic", "has --width 2, but this run asks for 4"),
    ("keys", "basic", "holds no DilatedNet front-end"),
    ("no_context", "none", "give --context basic or large"),
])
def test_a_bad_init_from_exits_2_naming_the_file(tmp_path, capsys, case, context, expected):
    path = tmp_path / f"{case}.pt"
    if case == "garbage":
        path.write_text("not a checkpoint")
    elif case == "state_dict":
        torch.save(DilatedNet(11, width=2, fc_channels=8).state_dict(), path)
    elif case != "missing":
        settings = {"stage2": {"model": "basic"}, "classifier": {"model": "resnet50"},
                    "classes": {"num_classes": 3}, "keys": {"prefix": "net."}}
        _fake_checkpoint(path, **settings.get(case, {}))
    extra = ("--width", "4") if case == "width" else ()
    out = tmp_path / "out"
    code = train.main(_canvas_flags(out, "--context", context, "--init-from", str(path), *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and expected in err and str(path) in err, err
    assert not out.exists()


def test_a_good_fake_frontend_checkpoint_is_loaded(tmp_path):
    path = _fake_checkpoint(tmp_path / "front.pt")
    net = train.load_frontend(path, len(CANVAS_CLASSES))
    saved = torch.load(path, weights_only=True)["model_state"]
    assert net.context is None and net.frontend.width == 2
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def test_bad_weights_exit_2(tmp_path, capsys):
    missing = tmp_path / "vgg16.pth"
    assert train.main(_canvas_flags(tmp_path / "a", "--weights", str(missing))) == 2
    assert "VGG16 weights" in capsys.readouterr().err
    assert train.main(_canvas_flags(tmp_path / "b", "--weights", str(missing),
                                    "--width", "8")) == 2
    assert "leave --width and --fc-channels out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:
        train.main(_canvas_flags(tmp_path / "c", "--weights", str(missing), "--init-from",
                                 str(missing)))
    assert both.value.code == 2


def test_demo_at_a_tiny_scale(tmp_path, capsys):
    rows = demo.run(tmp_path, epochs=1, context_epochs=1, image_size=32, width=2, fc_channels=8,
                    limit=8, samples=2)
    assert [r["network"] for r in rows] == ["front-end", "+ basic context", "+ large context",
                                            "front-end (control)"]
    widths = {r["network"]: r["parameters"] for r in rows}
    assert widths["front-end"] == widths["front-end (control)"] < widths["+ basic context"] \
        < widths["+ large context"]
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows)
    assert {"start_miou", "frontend_miou"} <= rows[1].keys()
    assert rows[1]["frontend_miou"] == pytest.approx(rows[0]["miou"], abs=1e-6)
    text = capsys.readouterr().out
    assert "VOC 2012" in text and "width 2 (VGG16: 64)" in text and "32x32" in text
    assert (tmp_path / demo.PREDICTIONS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_torchrun_stage2_on_two_cpu_processes(frontend_run, shapes, tmp_path):
    """Stage 2 under DDP: the start report is scored on both ranks' shards and reduced."""
    out = tmp_path / "large"
    flags = [f for f in _flags(shapes, out, "--context", "large", "--init-from",
                               str(frontend_run / "best.pt"), epochs=1) if f != "--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "examples.dilatednet.train", *flags]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["model"] == "large"
    report = json.loads((out / train.STAGE2_REPORT).read_text())
    assert report["frontend"]["test_images"] == report["stage2_start"]["test_images"] == 16
    best = torch.load(frontend_run / "best.pt", weights_only=True)
    assert report["frontend"]["miou"] == pytest.approx(best["best"]["miou"], abs=1e-6)
    assert result.stdout.count("start of stage 2") == 1


# --- scoring at the label's own resolution; batches with nothing to score -------------------

ODD_SIZES = [(37, 53), (29, 41), (45, 31), (33, 33)]  # (H, W) of the val labels


def _odd_folder(root: Path) -> Path:
    """Train and val images of odd, non-square sizes; val masks with an ignored band."""
    generator = torch.Generator().manual_seed(3)
    for split, sizes in (("train", ODD_SIZES[:2]), ("val", ODD_SIZES)):
        for i, (h, w) in enumerate(sizes):
            image = torch.rand(3, h, w, generator=generator)
            mask = torch.randint(0, 3, (h, w), generator=generator)
            mask[h // 3:h // 2, w // 4:] = 1 + i % 2
            mask[:, w - 3:] = IGNORE_INDEX
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(
                root / split / "images" / f"{i}.png")
            Image.fromarray(mask.byte().numpy()).save(root / split / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def _probe_net() -> nn.Module:
    """Class scores computed at a quarter of the input's resolution and up-sampled bilinearly
    to the input's, as DilatedNet's are."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, len(CLASSES), 3, padding=1), nn.AvgPool2d(4),
                         nn.Upsample(scale_factor=4, mode="bilinear")).eval()


def _cpu_step() -> _Step:
    return _Step(TrainConfig(model="none", out=Path("unused")), torch.device("cpu"),
                 train.TASK)


def test_val_is_scored_at_each_labels_own_size(tmp_path):
    """mIoU, pixel accuracy and test loss equal those of a confusion matrix and cross-entropy
    computed over every pixel of the mask files, the network's scores resized to each file."""
    root = _odd_folder(tmp_path)
    _, val, classes = build_segmentation_datasets("folder", root, 16, None, 0)
    net = _probe_net()
    loader = DataLoader(val, batch_size=3, collate_fn=partial(train.TASK.collate, train=False))
    figures = evaluate(net, loader, _cpu_step(), len(classes)).compute(
        Dist(0, 1, 0, torch.device("cpu")))

    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    loss_sum, scored = 0.0, 0
    for i, (h, w) in enumerate(ODD_SIZES):
        with Image.open(root / "val" / "masks" / f"{i}.png") as file:
            mask = torch.from_numpy(np.asarray(file).astype(np.int64))
        assert mask.shape == (h, w)
        with torch.no_grad():
            logits = F.interpolate(net(val[i][0][None]), size=(h, w), mode="bilinear",
                                   align_corners=False)
        keep = mask != IGNORE_INDEX
        predicted = logits[0].argmax(0)
        confusion += torch.bincount(mask[keep] * len(classes) + predicted[keep],
                                    minlength=len(classes) ** 2).view(len(classes), -1)
        loss_sum += F.cross_entropy(logits, mask[None], ignore_index=IGNORE_INDEX,
                                    reduction="sum").item()
        scored += int(keep.sum())
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    assert (union > 0).all()
    assert figures["miou"] == pytest.approx((hits / union).mean().item(), abs=1e-6)
    assert figures["pixel_acc"] == pytest.approx(hits.sum().item() / scored, abs=1e-6)
    assert figures["test_loss"] == pytest.approx(loss_sum / scored, rel=1e-5)
    assert figures["test_images"] == len(ODD_SIZES)


def _all_ignored(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch[0], torch.full_like(batch[1], IGNORE_INDEX)


def test_a_batch_with_every_pixel_ignored_adds_nothing_to_the_losses():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    masks = torch.randint(0, 3, (4, 16, 16), generator=generator)
    scored, ignored = (images[:2], masks[:2]), _all_ignored((images[2:], masks[2:]))
    net, step = _probe_net().train(), _cpu_step()
    with torch.no_grad():
        expected = F.cross_entropy(net(scored[0]), scored[1]).item()
    # the ignored batch comes first: plain SGD on its zero gradient leaves the weights as they are
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with tqdm(total=2, disable=True) as bar:
        seen = train_one_epoch(net, [ignored, scored], optimizer, scaler, step, bar).local()
    assert seen.loss == pytest.approx(expected, rel=1e-5) and seen.count == 4
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    alone = evaluate(net, [(scored[0], list(scored[1]))], step, 3).compute(cpu)
    both = evaluate(net, [(scored[0], list(scored[1])), (ignored[0], list(ignored[1]))],
                    step, 3).compute(cpu)
    assert math.isfinite(both["test_loss"])
    assert {k: v for k, v in both.items() if k != "test_images"} == pytest.approx(
        {k: v for k, v in alone.items() if k != "test_images"})
    nothing = evaluate(net, [(ignored[0], list(ignored[1]))], step, 3).compute(cpu)
    assert nothing["test_loss"] == 0.0
