"""MACs and parameters that are right for dynamic kernels and spatial masks.

Generic counters get these operators wrong (see the reference notes): the
grouped-conv trick of dynamic convolution hides the conv from module hooks, and
a dense-masked gated block costs the same as a dense one to every counter. So
the count is ptflops with the backend pinned to ``pytorch`` (module hooks),
functional patching off (it would double count inside our modules), and one
custom hook for every operator that counts itself: a module with a
``counted_macs(x)`` method reports the MACs of the forward it just ran on the
batch ``x``. For example:

- ``DynamicConv2d`` / ``SDConv2d`` / ``ODConv2d``: conv + kernel aggregation
  + attention branch, from the operator's ``macs(input_shape)`` (SD-Conv
  counts kept weights).
- Gated blocks (DynConv): from the masks of the forward that just ran (mask
  unit + executed positions, dilated mask for the first conv + dense shortcut
  projection). ptflops does not descend into a module that has a hook, so
  the block's inner convs are not counted twice.

Parameters: a module with ``pruned_params()`` (SD-Conv) reports how many of
its parameters its masks remove; nonzero parameters leave those out.

BatchNorm, activations and pooling are excluded, as in ``torch.utils.flop_counter``:
the counts are multiply-accumulates of convolutions and linear layers. MACs,
not FLOPs: FLOPs = 2 x MACs.
"""

from __future__ import annotations

import io

import torch
from torch import nn

EXCLUDED = [
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
    nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten,
]


def _self_counting_hook(module, inputs, output) -> None:
    module.__flops__ += int(module.counted_macs(inputs[0]))


def custom_hooks(model: nn.Module) -> dict:
    """One hook per module type of ``model`` that counts its own MACs (ptflops matches exact types)."""
    return {type(m): _self_counting_hook for m in model.modules() if callable(getattr(m, "counted_macs", None))}


@torch.no_grad()
def count_macs(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean MACs per image of ``model`` in eval mode over ``images`` (already normalised).

    For gated models the count depends on the masks each image fires, so pass
    the evaluation set, not a single dummy input.
    """
    from ptflops import get_model_complexity_info
    from ptflops.flops_counter import FLOPS_BACKEND

    was_training = model.training
    hooks = custom_hooks(model)
    total = 0.0
    try:
        for chunk in images.split(batch_size):
            macs, _ = get_model_complexity_info(
                model, tuple(chunk.shape[1:]), input_constructor=lambda _res, c=chunk: c,
                print_per_layer_stat=False, as_strings=False, ost=io.StringIO(),
                backend=FLOPS_BACKEND.PYTORCH, backend_specific_config={"count_functional": False},
                custom_modules_hooks=hooks, ignore_modules=EXCLUDED,
            )
            if macs is None:  # ptflops swallows the exception and returns None
                raise RuntimeError("MAC counting failed: ptflops could not run the model")
            total += float(macs) * len(chunk)
    finally:
        model.train(was_training)
    return total / max(1, len(images))


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters, and nonzero parameters (without the ones a module's masks remove)."""
    total = sum(p.numel() for p in model.parameters())
    pruned = sum(m.pruned_params() for m in model.modules() if callable(getattr(m, "pruned_params", None)))
    return {"params": total, "nonzero_params": total - pruned}
