"""Time dilconv blocks against their peers (torchvision.ops, timm.layers) in one run.

Prints a table and writes ``--out`` (JSON) with per-case milliseconds and the ratio
dilconv / peer (below 1 means dilconv is faster). Runs on CUDA when available.

    python -m benchmarks.run --device cuda --out runs/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["CASES", "main", "time_modules"]


def _step(module: nn.Module, inputs: object, backward: bool) -> None:
    out = module(inputs)
    if backward:
        tensors = list(out.values()) if isinstance(out, dict) else out
        tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        sum(t.float().mean() for t in tensors).backward()


def time_modules(
    modules: list[nn.Module], inputs: object, *, steps: int, backward: bool
) -> list[float]:
    """Median milliseconds per call of each module, timed in alternation after warm-up.

    Alternating the modules step by step spreads any change in machine load over all of them.
    """
    device = next(modules[0].parameters()).device
    for module in modules:
        for _ in range(2):
            _step(module, inputs, backward)
    times: list[list[float]] = [[] for _ in modules]
    for _ in range(steps):
        for module, record in zip(modules, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _step(module, inputs, backward)
            if device.type == "cuda":
                torch.cuda.synchronize()
            record.append((time.perf_counter() - start) * 1e3)
    return [sorted(r)[len(r) // 2] for r in times]


def _fpn_pair(size: int) -> tuple[nn.Module, nn.Module, object]:
    from torchvision.ops import FeaturePyramidNetwork

    from dilconv import FPNNeck

    channels = [256, 512, 1024, 2048]
    feats = {str(i): torch.randn(2, c, size // 2**i, size // 2**i) for i, c in enumerate(channels)}
    return FPNNeck(channels, 256), FeaturePyramidNetwork(channels, 256), feats


def _cbam_pair(size: int) -> tuple[nn.Module, nn.Module, object]:
    from timm.layers.cbam import CbamModule

    from dilconv import CBAM

    return CBAM(256), CbamModule(256), torch.randn(8, 256, size, size)


def _backbone_pair(size: int) -> tuple[nn.Module, nn.Module, object]:
    import torchvision

    from dilconv import DilatedResNet

    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    ours = DilatedResNet.from_torchvision(torchvision.models.resnet50(weights=None), 8)
    tv_body = nn.Sequential(*list(tv.children())[:-2])
    return ours, tv_body, torch.randn(2, 3, size * 4, size * 4)


CASES: dict[str, Callable[[int], tuple[nn.Module, nn.Module, object]]] = {
    "FPNNeck vs torchvision FeaturePyramidNetwork": _fpn_pair,
    "CBAM vs timm CbamModule": _cbam_pair,
    "DilatedResNet-50 OS8 vs torchvision dilated resnet50": _backbone_pair,
}


def _to(obj: object, device: torch.device, channels_last: bool) -> object:
    if isinstance(obj, dict):
        return {k: _to(o, device, channels_last) for k, o in obj.items()}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return obj.to(device, memory_format=fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=32, help="finest map / 4x input side")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    print(f"{'case':<55}{'dilconv ms':>12}{'peer ms':>10}{'ratio':>8}")
    for name, make in CASES.items():
        ours, peer, inputs = make(args.size)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        ours, peer = (m.to(device, memory_format=fmt) for m in (ours, peer))
        inputs = _to(inputs, device, args.channels_last)
        with torch.set_grad_enabled(args.backward):
            ms_ours, ms_peer = time_modules(
                [ours, peer], inputs, steps=args.steps, backward=args.backward
            )
        rows.append({"case": name, "dilconv_ms": ms_ours, "peer_ms": ms_peer,
                     "ratio": ms_ours / ms_peer})
        print(f"{name:<55}{ms_ours:>12.2f}{ms_peer:>10.2f}{ms_ours / ms_peer:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "machine": platform.machine(),
            "size": args.size, "steps": args.steps, "backward": args.backward,
            "channels_last": args.channels_last}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
