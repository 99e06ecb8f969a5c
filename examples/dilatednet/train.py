"""Train DilatedNet (Yu & Koltun, ICLR 2016) for semantic segmentation: the front-end, then the
context module on top of it (seed 002).

Examples::

    # stage 1, the front-end from ImageNet (torchvision's vgg16-397923af.pth, fetched by you)
    python -m examples.dilatednet.train --dataset voc --data ~/voc --weights vgg16-397923af.pth \\
        --out runs/frontend
    # stage 2, the basic context module on the trained front-end (identity-initialised)
    python -m examples.dilatednet.train --dataset voc --data ~/voc --context basic \\
        --init-from runs/frontend/best.pt --out runs/basic
    # offline on a CPU: digit canvases and a narrow network
    python -m examples.dilatednet.train --dataset digits-canvas --image-size 96 --width 4 \\
        --fc-channels 64 --dropout 0 --optimizer adamw --weight-decay 0.01 --batch-size 4 \\
        --epochs 16 --out runs/canvas
    torchrun --nproc_per_node=4 -m examples.dilatednet.train --data ~/seg --out runs/seg

``--context none|basic|large`` (default none) picks the network and is the model name a
checkpoint records, so ``--resume`` never mixes a front-end run with a context run. ``--data ROOT``
is a mask folder (images/ and masks/) or Pascal VOC 2012 (``ROOT/VOCdevkit/VOC2012``; an empty
ROOT with ``--download`` fetches it), recognised by its layout (:mod:`examples.harness.layouts`);
``--dataset digits-canvas`` generates canvases offline. Validation is scored at each mask's own
size (the Pascal VOC protocol; :class:`~examples.harness.tasks.SegmentationTask`).

Defaults (:data:`RECIPE`) are the paper's front-end recipe as the seed gives it ("Training":
SGD, mini-batch 14, learning rate 1e-3, momentum 0.9, 60K iterations): ``--optimizer sgd --lr
1e-3 --momentum 0.9 --no-nesterov --batch-size 14``, with weight decay 5e-4 (the seed names
none; 5e-4 is VGG's usual value). The seed gives no schedule: the rate falls on the harness's
per-epoch cosine over ``--epochs`` (100; ``--lr-milestones`` gives steps instead). A network
trained from scratch on the digit canvases learns far faster with AdamW (the tests and the demo
pass their own flags).

Where the weights come from: ``--weights PATH`` copies an ImageNet VGG16 state_dict into the
front-end (:meth:`DilatedNet.from_torchvision`, width 64, fc6/fc7 as the file has them);
``--init-from PATH`` (stage 2) reads the front-end of a ``checkpoint.pt`` or ``best.pt`` this
script wrote with ``--context none``, then adds the context module
(:meth:`DilatedNet.add_context`); otherwise everything starts from random initialisation.

The start of stage 2: the context module is identity-initialised, but its ReLUs truncate negative
input (eq. 4 is an identity only on non-negative maps), and the front-end's class scores come out
of a 1x1 convolution with no activation, so they are unbounded. At the start of stage 2 the basic
module therefore computes ``relu(scores)``: where the largest class score of a pixel is positive
its arg-max is kept (bilinear up-sampling mixes neighbouring score pixels, so only nearly);
where every class score is negative all become 0 and the arg-max falls to class 0, the
background. The large module adds the small noise of eq. 5 to that. So the network at the start
of stage 2 is not the front-end: with ``--init-from`` the script scores both on the val data
before training, prints the two mean IoUs and their difference, and writes them with the share
of val pixels whose predicted class changed to ``OUT/stage2_start.json``. Measured on the narrow
networks of the tests and the demo: on two digit-canvas front-ends that had learnt a little
(mIoU 0.10-0.11), the start of stage 2 was 0.010 and 0.012 mIoU lower with the basic module and
0.008 and 0.000 lower with the large one, about 4% of the val pixels changing class (with the
basic module, by construction, from a digit whose best score was negative to background); on
coloured rectangles (front-end mIoU 0.43) it was 0.001 (basic) and 0.004 (large) higher, 0.4%
and 2.4% of the pixels changing; on a front-end that still predicted background everywhere the
basic start was identical and the large one 0.015 higher (its noise lifted a few pixels).

Outputs in ``--out``: ``checkpoint.pt``, ``best.pt``, ``metrics.json`` and ``curves.png`` (see
:mod:`examples.harness.loop`), and ``stage2_start.json`` for a stage-2 run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from examples.dilatednet.data import DATASETS, build_segmentation_datasets
from examples.dilatednet.models import DilatedNet, load_vgg16_weights
from examples.harness import TrainConfig
from examples.harness import main as harness_main
from examples.harness.checkpoint import FORMAT, CheckpointError, atomic_write
from examples.harness.config import bounded_float, positive_int
from examples.harness.distributed import Dist, broadcast_object, reduce_sums, setup
from examples.harness.tasks import SegmentationTask, scores_at_mask_size

__all__ = [
    "CONTEXTS",
    "FRONTEND",
    "MODELS",
    "RECIPE",
    "STAGE2_REPORT",
    "TASK",
    "build_datasets",
    "compare_stage2_start",
    "load_frontend",
    "main",
]

CONTEXTS: dict[str, str | None] = {"none": None, "basic": "basic", "large": "large"}
"""``--context`` value (the model name in checkpoints) -> ``DilatedNet``'s ``context``."""
FRONTEND = "none"
"""The model name of a front-end run, the only kind ``--init-from`` takes."""
STAGE2_REPORT = "stage2_start.json"
VGG16_WIDTH = 64
# The harness flags the paper fixes for the front-end (seed 002, "Training"), weight decay VGG's.
RECIPE: dict[str, object] = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9,
                             "nesterov": False, "weight_decay": 5e-4, "batch_size": 14}

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {name: partial(DilatedNet, context=context)
                                   for name, context in CONTEXTS.items()}


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, classes) of ``config.dataset`` (see
    :func:`~examples.dilatednet.data.build_segmentation_datasets`)."""
    return build_segmentation_datasets(config.dataset, config.data, config.image_size,
                                       config.limit, config.seed, config.download)


TASK = SegmentationTask(build_datasets, DATASETS, "folder")






def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(**RECIPE)
    net = parser.add_argument_group("DilatedNet")
    net.add_argument("--width", type=positive_int, help="channels of conv1; the blocks have width "
                     "x (1, 2, 4, 8, 8) (default 64, VGG16; with --init-from, the checkpoint's)")
    net.add_argument("--fc-channels", type=positive_int, help="channels of fc6 and fc7 (default "
                     "64 x width, VGG16's 4096; with --init-from, the checkpoint's)")
    net.add_argument("--dropout", type=bounded_float(0.0, 1.0, include_high=False), default=0.5,
                     help="dropout after fc6 and fc7 (the paper's 0.5)")
    start = net.add_mutually_exclusive_group()
    start.add_argument("--weights", type=Path, help="a torchvision VGG16 state_dict (.pth) for "
                       "the front-end (ImageNet initialisation, as the paper)")
    start.add_argument("--init-from", type=Path, help="stage 2: the checkpoint.pt or best.pt "
                       "of a --context none run; its front-end gets the --context module")


def load_frontend(path: Path, num_classes: int, *, width: int | None = None,
                  fc_channels: int | None = None, dropout: float = 0.5) -> DilatedNet:
    """The front-end DilatedNet saved in a checkpoint of this script (``--context none``).

    The file is read with ``torch.load(weights_only=True)``; width and fc channels come from the
    saved weights. The network is built on the meta device and takes the loaded tensors as
    they are, on the CPU.

    Args:
        path: ``checkpoint.pt`` or ``best.pt`` of a front-end run.
        num_classes: classes of the data this run trains on.
        width: conv1's channels the caller asked for (None: take the checkpoint's).
        fc_channels: fc6/fc7 channels the caller asked for (None: take the checkpoint's).
        dropout: after fc6 and fc7 (not stored in a checkpoint).

    Raises:
        CheckpointError: the file is missing or unreadable, not a checkpoint of this script's
            front-end, or made for another class count, width or fc width. The one-line
            message names the file.
    """
    where = f"--init-from {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file (give the checkpoint.pt or best.pt of a "
                              "--context none run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip or pickle
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(f"{where} cannot be read as a weights-only checkpoint "
                              f"({type(exc).__name__}: {first.strip()})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT \
            or not isinstance(state.get("model_state"), dict):
        raise CheckpointError(f"{where} is not a checkpoint of these train scripts (expected "
                              f"format {FORMAT!r} with model weights)")
    model = state.get("model")
    if model != FRONTEND:
        kind = (f"a stage-2 checkpoint (--context {model})" if model in CONTEXTS
                else f"a checkpoint of model {model!r}")
        raise CheckpointError(f"{where} is {kind}; stage 2 starts from a front-end checkpoint "
                              f"(--context {FRONTEND})")
    if state.get("num_classes") != num_classes:
        raise CheckpointError(f"{where} scores {state.get('num_classes')} classes, but this "
                              f"run's data has {num_classes}")
    weights: dict[str, Tensor] = state["model_state"]
    conv1, fc6 = (weights.get(f"frontend.{key}.weight") for key in ("features.conv1_1", "fc6"))
    if conv1 is None or fc6 is None:
        raise CheckpointError(f"{where} holds no DilatedNet front-end (no frontend.* weights)")
    found = {"--width": conv1.shape[0], "--fc-channels": fc6.shape[0]}
    for flag, asked in (("--width", width), ("--fc-channels", fc_channels)):
        if asked is not None and asked != found[flag]:
            raise CheckpointError(f"{where} has {flag} {found[flag]}, but this run asks for "
                                  f"{asked}; leave {flag} out to take the checkpoint's")
    net = DilatedNet(num_classes, width=found["--width"], fc_channels=found["--fc-channels"],
                     dropout=dropout, device="meta")
    try:
        net.load_state_dict(weights, assign=True)
    except RuntimeError as exc:
        message = " ".join(str(exc).split())
        raise CheckpointError(f"{where} does not fit a DilatedNet front-end ({message})") from exc
    return net


class _KeepsScores(nn.Module):
    """``net`` unchanged, remembering its last output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.logits = self.net(x)
        return self.logits

    def predicted(self, masks: Sequence[Tensor]) -> Tensor:
        """The arg-max of the last output at each mask's size, all pixels in one 1-d tensor."""
        assert self.logits is not None, "call the network first"
        scores = scores_at_mask_size(self.logits.float(), masks)
        return torch.cat([s.argmax(0).flatten() for s in scores])


@torch.no_grad()
def compare_stage2_start(frontend: nn.Module, start: nn.Module, val: Dataset, num_classes: int,
                         config: TrainConfig, info: Dist, task: SegmentationTask = TASK
                         ) -> dict[str, object]:
    """Score the front-end and the network at the start of stage 2 on ``val``, in eval mode.

    Each rank scores every ``world_size``-th image; the figures are those of the harness's
    evaluator (``task.evaluator``, at each mask's own size), reduced over ranks, so they compare
    with ``metrics.json``.

    Returns:
        ``{"frontend": figures, "stage2_start": figures, "difference": start minus front-end
        for miou, pixel_acc and test_loss, "changed_pixels": share of scored val pixels whose
        predicted class differs}``; figures are ``test_loss``, ``miou``, ``pixel_acc``,
        ``test_images`` as in the history.
    """
    device = info.device
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype, enabled=config.amp)
    workers = config.workers
    if workers is None:
        in_memory = config.dataset == "digits-canvas"
        workers = 0 if in_memory else min(4, torch.multiprocessing.cpu_count())
    loader = DataLoader(Subset(val, range(info.rank, len(val), info.world_size)),
                        batch_size=config.batch_size, num_workers=workers,
                        collate_fn=partial(task.collate, train=False))
    nets = {name: _KeepsScores(net).to(device, memory_format=memory_format).eval()
            for name, net in (("frontend", frontend), ("stage2_start", start))}
    scores = {name: task.evaluator(num_classes, device, autocast) for name in nets}
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        images, masks = task.to_device(batch, device, memory_format)
        for name, net in nets.items():
            scores[name].update(net, images, masks)
        scored = torch.cat([mask.flatten() for mask in masks]) != task.ignore_index
        moved = nets["frontend"].predicted(masks) != nets["stage2_start"].predicted(masks)
        counts += torch.stack([(moved & scored).sum(), scored.sum()]).double()
    figures = {name: s.compute(info) for name, s in scores.items()}
    changed, total = reduce_sums(counts, info)
    return {**figures,
            "difference": {key: figures["stage2_start"][key] - figures["frontend"][key]
                           for key in ("miou", "pixel_acc", "test_loss")},
            "changed_pixels": changed / max(total, 1.0)}


def _fresh_start(config: TrainConfig, info: Dist) -> bool:
    """Rank 0's word on whether this run starts at epoch 0 (no checkpoint.pt to resume or to
    be refused over), so that every rank scores the start of stage 2 or none does."""
    fresh = not (config.checkpoint and (config.out / "checkpoint.pt").exists())
    return bool(broadcast_object(fresh, info))


def _report_stage2_start(frontend: DilatedNet, start: DilatedNet, val: Dataset,
                         config: TrainConfig, info: Dist, init_from: Path) -> None:
    report = {"init_from": str(init_from), "context": start.context.variant,
              **compare_stage2_start(frontend, start, val, start.num_classes, config, info)}
    if not info.is_main:
        return
    config.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(config.out / STAGE2_REPORT, lambda f: f.write(text.encode()))
    if not config.quiet:
        before, after = report["frontend"]["miou"], report["stage2_start"]["miou"]
        tqdm.write(f"start of stage 2 ({init_from} + {start.context.variant} context, before "
                   f"training): val mIoU {after:.4f} vs front-end alone {before:.4f} "
                   f"({after - before:+.4f}); {report['changed_pixels']:.2%} of pixels changed "
                   f"class -> {config.out / STAGE2_REPORT}")


def _stage2(args: argparse.Namespace, config: TrainConfig, variant: str) -> ModelFactory:
    """Load the front-end, add the context module, report the start; the factory hands that
    network to :func:`~examples.harness.loop.fit` (which calls it once)."""
    info = setup(config.device)
    _, val, classes = TASK.datasets(config)
    frontend = load_frontend(args.init_from, len(classes), width=args.width,
                             fc_channels=args.fc_channels, dropout=args.dropout)
    # The large module's eq.-5 noise: drawn from --seed, the same on every rank.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        start = frontend.add_context(variant)
    if _fresh_start(config, info):
        _report_stage2_start(frontend, start, val, config, info, args.init_from)
    del frontend  # start holds its own copy; with VGG16 this frees half a gigabyte

    def factory(num_classes: int) -> DilatedNet:
        if num_classes != len(classes):
            raise CheckpointError(f"--init-from {args.init_from}: the data changed from "
                                  f"{len(classes)} to {num_classes} classes while starting")
        return start

    return factory


def _setup_run(args: argparse.Namespace, config: TrainConfig) -> Mapping[str, ModelFactory]:
    variant = CONTEXTS[config.model]
    if args.init_from is not None:
        if variant is None:
            raise CheckpointError(f"--init-from {args.init_from} starts stage 2, which adds a "
                                  "context module: give --context basic or large")
        return {config.model: _stage2(args, config, variant)}
    if args.weights is not None:
        if (args.width or VGG16_WIDTH) != VGG16_WIDTH or args.fc_channels is not None:
            raise CheckpointError(f"--weights {args.weights} is VGG16: leave --width and "
                                  "--fc-channels out (64, and the file's fc6 width)")
        try:
            vgg16 = load_vgg16_weights(args.weights)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(f"--weights: {exc}") from exc
        return {config.model: partial(DilatedNet.from_torchvision, vgg16, context=variant,
                                      dropout=args.dropout)}
    return {config.model: partial(DilatedNet, context=variant, width=args.width or VGG16_WIDTH,
                                  fc_channels=args.fc_channels, dropout=args.dropout)}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for a data, checkpoint or weights error).

    The harness makes its model flag (here ``--context``) required; ``--context none`` is put
    in front of the arguments, so a ``--context`` given later wins and none is the default.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return harness_main(["--context", FRONTEND, *argv], MODELS, description=__doc__, task=TASK,
                        extra_arguments=_add_arguments, setup_run=_setup_run,
                        model_flags=("--context",))


if __name__ == "__main__":
    raise SystemExit(main())
