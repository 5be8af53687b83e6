"""Control of SD-Conv: DyNet's trained model pruned by weight magnitude to SD-Conv's measured sparsity.

SD-Conv learns a threshold per group of kernel weights (He et al., WACV 2023);
whether the learning finds better masks than plain magnitude pruning is judged
against this control: the trained DyNet model (same K and width), every
layer's K kernels pruned by |W| within SD-Conv's threshold groups to the
kernel sparsity SD-Conv reached in that layer (``results/convert/sdconv/layers.json``),
masks frozen, then fine-tuned with SD-Conv's recipe (``convert.sdconv``:
epochs, optimizer, distillation; no threshold regulariser, the coefficient
temperature kept where DyNet's training ended).
"""

from __future__ import annotations

import json

from pipeline.config import TemperatureCfg
from pipeline.errors import UserError
from pipeline.methods import dynet, get, sdconv
from pipeline.methods.files import load_any_model
from pipeline.methods.sdconv import SDConv, freeze_masks, init_thresholds



class Magnitude(SDConv):
    name = "magnitude"
    label = "magnitude pruning (SD-Conv's sparsity)"
    paper = "control of " + sdconv.PAPER
    control_of = sdconv.METHOD.name
    search = None
    columns = {"kernel sparsity": "kernel_sparsity"}

    def warm_start(self, model, p, cfg, x):
        source = dynet.METHOD.model_file
        layers = get(self.control_of).layers_file
        for path in (source, layers):
            if not path.is_file():
                raise UserError(f"'{path}' not found: the {self.label} control needs DyNet and SD-Conv to run first")
        trained, _, _ = load_any_model(source)
        missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or any(not k.endswith(".threshold") for k in missing):
            raise UserError(f"'{source}' is not DyNet at SD-Conv's K and width (convert.dynet and convert.sdconv differ)")
        sparsity = json.loads(layers.read_text())["kernel_sparsity"]
        for name, layer in self.layers(model):
            init_thresholds(layer, sparsity[name])
        freeze_masks(model)

    def fixed(self, p):
        """SD-Conv's params with the masks frozen: no regulariser, no collapse reset, temperature at its end."""
        end = p.temperature.end
        return p.model_copy(update={"reg_weight": 0.0, "min_keep": 0.0,
                                    "temperature": TemperatureCfg(start=end, end=end, epochs=0)})

    def hooks(self, model, p, *, teacher=None, val_x=None):
        return super().hooks(model, self.fixed(p), teacher=teacher)

    def restore(self, model, p) -> None:
        super().restore(model, self.fixed(p))

    def latency_variants(self):
        return []

    def claims(self):
        return []


METHOD = Magnitude()
