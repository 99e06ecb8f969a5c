"""How close a block runs to what the hardware allows: FLOPs, bytes, its convolutions alone,
and which kernels ran.

- FLOPs come from one pass under ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products; element-wise work counts zero).
- Bytes moved are the analytic minimum: every input tensor read once and every output written
  once in the forward pass; forward+backward moves that twice (the output's gradient read
  and one gradient per input written, the same sizes again).
- "Convolutions alone" replays every ``nn.Conv2d`` of the block on inputs of the shapes it
  saw in one forward pass, in the same order, without anything between them (eagerly, also
  under ``--compile``).
- The profiler records the operator names of one pass; ``aten::slow_conv_dilated2d`` is the
  unvectorised fallback some CPUs take for dilated convolutions under bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SLOW_KERNEL", "ConvReplay", "count_flops", "kernels", "tensor_bytes", "tensors"]

SLOW_KERNEL = "slow_conv_dilated2d"


def tensors(obj: object) -> list[Tensor]:
    """Every tensor in a tensor, sequence or mapping (one level deep)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [v for v in obj.values() if isinstance(v, Tensor)]
    if isinstance(obj, (list, tuple)):
        return [v for v in obj if isinstance(v, Tensor)]
    return []


def tensor_bytes(objs: Iterable[object]) -> int:
    """Bytes held by every tensor in ``objs``."""
    return sum(t.numel() * t.element_size() for obj in objs for t in tensors(obj))


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward, or forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def kernels(step: Callable[[], object], device: torch.device) -> list[str]:
    """Sorted names of the convolution operators one call of ``step`` ran, and on CUDA of
    every GPU kernel (cuDNN's kernel names need not say "conv")."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = {
        event.key for event in prof.key_averages()
        if "conv" in event.key.lower() or event.device_type == DeviceType.CUDA
    }
    return sorted(names)


class ConvReplay(nn.Module):
    """The ``nn.Conv2d`` modules of ``block`` run in sequence on inputs of the shapes they saw.

    ``forward()`` takes no argument and returns the list of outputs. The recorded inputs are
    fresh random tensors (with ``requires_grad`` where asked), so the replay depends on nothing
    but the shapes, dtype and memory format of one pass of ``block``.

    Args:
        block: the module whose convolutions are replayed.
        run: one forward pass of ``block`` (the hooks record what each convolution receives).
        requires_grad: whether the recorded inputs need a gradient (forward+backward).
    """

    def __init__(self, block: nn.Module, run: Callable[[], object], requires_grad: bool) -> None:
        super().__init__()
        convs: list[nn.Conv2d] = []
        inputs: list[Tensor] = []

        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            convs.append(module)  # type: ignore[arg-type]
            fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous() else torch.contiguous_format)
            fresh = torch.randn(x.shape, device=x.device, dtype=x.dtype)
            inputs.append(fresh.contiguous(memory_format=fmt).requires_grad_(requires_grad))

        handles = [m.register_forward_pre_hook(record) for m in block.modules()
                   if isinstance(m, nn.Conv2d)]
        try:
            with torch.no_grad():
                run()
        finally:
            for handle in handles:
                handle.remove()
        self.convs = convs  # a plain list: the modules stay registered with their block only
        self.recorded = inputs

    def __len__(self) -> int:
        return len(self.convs)

    def forward(self) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, self.recorded)]
