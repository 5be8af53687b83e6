"""Transfer and search helpers: frozen SD-Conv masks, the new head, stages by resolution,
the training subset, and the coefficient temperature restored on load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import methods
from pipeline.data import TensorTask
from pipeline.methods.dynconv import stage_budgets
from pipeline.methods.dynet import dynamic_layers
from pipeline.methods.files import load_any_model, save_method_model
from pipeline.methods.sdconv import freeze_masks, kept_weights
from pipeline.models import build_model
from pipeline.models.surgery import new_head
from pipeline.train import make_optimizer, no_weight_decay
from pipeline.search.trials import stage_of, train_subset

from .conftest import build_method, config, model_cfg, train_cfg

RESNET = model_cfg(arch="cifar_resnet", depth=8)


def sdconv_model(sparsity: float = 0.6):
    dense = build_model(RESNET, 1, 10)
    model, _ = build_method("sdconv", RESNET, {"width": 1.0, "init_sparsity": sparsity}, dense)
    return model


def test_frozen_masks_survive_finetuning():
    torch.manual_seed(0)
    model = sdconv_model()
    kept = freeze_masks(model)
    zero_before = [(m.weight == 0).clone() for _, m in dynamic_layers(model)]
    assert kept == kept_weights(model) and 0 < kept < sum(m.weight.numel() for _, m in dynamic_layers(model))
    head = new_head(model, 7, seed=1)
    assert model.fc is head and head.out_features == 7
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p is m.threshold for _, m in dynamic_layers(model) for p in params)
    opt = make_optimizer(train_cfg(), [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                         no_weight_decay(model))
    model.train()
    for _ in range(3):  # SGD with momentum, Nesterov and weight decay
        loss = F.cross_entropy(model(torch.randn(8, 1, 32, 32)), torch.randint(0, 7, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kept_weights(model) == kept
    for before, (_, m) in zip(zero_before, dynamic_layers(model)):
        assert torch.equal(m.weight == 0, before)  # pruned stayed pruned, kept stayed nonzero


def test_stages_follow_output_resolution():
    resnet14 = model_cfg(arch="cifar_resnet", depth=14)
    model, _ = build_method("dynconv", resnet14, {}, build_model(resnet14, 1, 10))
    blocks = methods.get("dynconv").search.modules(model)
    assert stage_of(model, blocks, torch.randn(2, 1, 32, 32)) == [0, 0, 1, 1, 2, 2]
    sd = sdconv_model()
    assert stage_of(sd, methods.get("sdconv").search.modules(sd), torch.randn(2, 1, 32, 32)) == [0, 0, 1, 1, 2, 2]


def test_stage_budgets_are_clipped():
    params = {"budget": 0.1, "offset_stage0": -0.15, "offset_stage1": 0.0, "offset_stage2": 0.95}
    assert stage_budgets(params, 3, 0.05) == pytest.approx([0.05, 0.1, 1.0])


def test_train_subset_is_seeded_and_cycles():
    x, y = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10)
    task = TensorTask({"train": (x, y), "val": (x, y), "test": (x, y)}, [str(i) for i in range(10)], [0.0], [1.0])
    a, b = train_subset(task, 25, seed=4), train_subset(task, 25, seed=4)
    assert torch.equal(a.splits["train"][1], b.splits["train"][1]) and len(a.splits["train"][1]) == 25
    assert sorted(a.splits["train"][1][:10].tolist()) == list(range(10))  # one full pass before repeating
    assert a.splits["val"][1] is y


def test_loaded_dynamic_model_has_the_trained_temperature(tmp_path):
    cfg = config({"model": {"arch": "cifar_resnet", "depth": 8},
                  "convert": {"dynet": {"width": 1.0, "temperature": {"start": 30.0, "end": 2.0, "epochs": 3},
                                        "train": {"epochs": 8}}}})
    dynet = methods.get("dynet")
    p = dynet.params(cfg)
    model, _ = dynet.build(cfg.model, p, 1, 10, seed=0, dense=build_model(cfg.model, 1, 10))
    assert all(m.temperature == 30.0 for _, m in dynamic_layers(model))  # as built: the schedule's start
    record = {"in_channels": 1, "num_classes": 10, "meta": {}}
    save_method_model(tmp_path / "m.pt", model, dynet, p, cfg, record)
    loaded, _, _ = load_any_model(tmp_path / "m.pt")
    assert all(m.temperature == 2.0 for _, m in dynamic_layers(loaded))
