"""The dense baseline: the pretrained backbone every method is converted from and compared with.

It has no convert stage (``pretrain`` writes ``models/dense.pt``); it takes
part in transfer and latency like the methods, and is the reference of every
claim.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.methods.base import Method
from pipeline.paths import MODELS


class Dense(Method):
    name = "dense"
    label = "dense"
    paper = "the pretrained backbone"
    baseline = True

    @property
    def model_file(self) -> Path:
        return MODELS / "dense.pt"

    @property
    def stage(self) -> str:
        return "pretrain"

    def convert(self, model, p, seed):
        return []

    def transfer_source(self, cfg: Config) -> Path:
        return self.model_file


METHOD = Dense()
