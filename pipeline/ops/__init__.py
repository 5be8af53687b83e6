"""Operators: dynamic kernels (DyNet family), SD-Conv, DynConv spatial gating."""
