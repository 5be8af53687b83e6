"""Control of KernelWarehouse: its recipe with one warehouse per conv, no cross-layer sharing.

KernelWarehouse's ingredient is the warehouse shared by the convs of a stage (Li & Yao, ICML 2024,
Sec. 3: "warehouse sharing"): every cell of a layer can draw on the cells of its neighbours. This control
runs the same conversion, budget (each conv's warehouse holds ``budget`` x its own cells), attention,
temperature initialisation, distillation and epochs with ``share: layer``, so the claim that sharing helps
is judged against it. Its params are ``convert.kernelwarehouse``'s, ``share`` set to ``layer``.
"""

from __future__ import annotations

from pipeline.methods import kernelwarehouse
from pipeline.methods.kernelwarehouse import KernelWarehouse


class UnsharedWarehouse(KernelWarehouse):
    name = "unshared_warehouse"
    label = "unshared warehouses (KernelWarehouse's budget, one warehouse per conv)"
    paper = "control of " + kernelwarehouse.PAPER
    control_of = kernelwarehouse.METHOD.name

    def params(self, cfg):
        return super().params(cfg).model_copy(update={"share": "layer"})

    def claims(self):
        return []

    def latency_variants(self):
        return []


METHOD = UnsharedWarehouse()
