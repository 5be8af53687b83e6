"""Dynamic-convolution ablation and reproducibility pipeline (DyNet, SD-Conv, DynConv)."""
