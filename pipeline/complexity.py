"""MACs and parameters that are right for dynamic kernels and spatial masks.

Generic counters get these operators wrong (see the reference notes): the
grouped-conv trick of dynamic convolution hides the conv from module hooks, and
a dense-masked gated block costs the same as a dense one to every counter. So
the count is ptflops with the backend pinned to ``pytorch`` (module hooks),
functional patching off (it would double count inside our modules), and one
custom hook per operator that asks the operator itself:

- ``DynamicConv2d`` / ``SDConv2d``: ``module.macs(input_shape)["total"]``
  (conv + kernel aggregation + coefficient branch; SD-Conv counts kept weights).
- ``GatedBasicBlock`` / ``GatedInvertedResidual``: ``module.macs_per_image()``
  from the masks of the forward that just ran (mask unit + executed positions,
  dilated mask for the first conv + dense shortcut projection). ptflops does
  not descend into a module that has a hook, so the block's inner convs are
  not counted twice.

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


def _dynamic_hook(module, inputs, output) -> None:
    x = inputs[0]
    module.__flops__ += int(module.macs(tuple(x.shape[1:]))["total"]) * x.shape[0]


def _gated_hook(module, inputs, output) -> None:
    module.__flops__ += int(module.macs_per_image().sum().item())


def custom_hooks() -> dict:
    from pipeline.ops.dynamic_conv import DynamicConv2d
    from pipeline.ops.sd_conv import SDConv2d
    from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual

    return {DynamicConv2d: _dynamic_hook, SDConv2d: _dynamic_hook,
            GatedBasicBlock: _gated_hook, GatedInvertedResidual: _gated_hook}


@torch.no_grad()
def count_macs(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean MACs per image of ``model`` in eval mode over ``images`` (already normalised).

    For gated models the count depends on the masks each image fires, so pass
    the evaluation set, not a single dummy input.
    """
    from ptflops import get_model_complexity_info
    from ptflops.flops_counter import FLOPS_BACKEND

    was_training = model.training
    hooks = custom_hooks()
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
    """Total parameters, and nonzero parameters (SD-Conv layers count only kept weights)."""
    from pipeline.ops.sd_conv import SDConv2d

    total = sum(p.numel() for p in model.parameters())
    nonzero = total
    for m in model.modules():
        if isinstance(m, SDConv2d):
            nonzero -= m.dense_params() - m.nonzero_params()
    return {"params": total, "nonzero_params": nonzero}
