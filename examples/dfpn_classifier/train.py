"""Train one of the Dilated-FPN study's five classifiers (seed 000, Table 2).

Examples::

    python -m examples.dfpn_classifier.train --model dfpn --dataset digits --image-size 32 \\
        --epochs 10 --out runs/dfpn-digits
    python -m examples.dfpn_classifier.train --model dfpn_a --data ~/tanks --out runs/tanks
    torchrun --nproc_per_node=4 -m examples.dfpn_classifier.train --model dfpn --data ~/tanks

Defaults are the study's (100 epochs, batch size 32, 256x256 images); ``--help`` lists the
rest. Outputs in ``--out``: ``checkpoint.pt`` (after every epoch; ``--resume`` continues it),
``metrics.json`` and ``curves.png``.
"""

from __future__ import annotations

from examples.dfpn_classifier.models import MODELS
from examples.harness import main as harness_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for a data or checkpoint error)."""
    return harness_main(argv, MODELS, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
