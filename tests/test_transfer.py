"""Transfer and search helpers: frozen SD-Conv masks, the new head, stages by resolution,
the training subset, and the coefficient temperature restored on load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConvertCfg, ModelCfg, TrainCfg, parse_config
from pipeline.convert import build_method_model
from pipeline.data import TensorTask
from pipeline.finetune import load_method_model, save_method_model
from pipeline.methods import dynamic_layers
from pipeline.models import build_model
from pipeline.train import make_optimizer
from pipeline.transfer import freeze_sd_masks, kept_weights, new_head
from pipeline.trials import searched_modules, stage_of, stage_budgets, train_subset

RESNET = ModelCfg(arch="cifar_resnet", depth=8)


def sdconv_model(sparsity: float = 0.6):
    mcfg = ConvertCfg().sdconv.model_copy(update={"width": 1.0, "init_sparsity": sparsity})
    dense = build_model(RESNET, 1, 10)
    model, _ = build_method_model("sdconv", RESNET, mcfg, 1, 10, seed=0, dense=dense)
    return model


def test_frozen_masks_survive_finetuning():
    torch.manual_seed(0)
    model = sdconv_model()
    kept = freeze_sd_masks(model)
    zero_before = [(m.weight == 0).clone() for _, m in dynamic_layers(model)]
    assert kept == kept_weights(model) and 0 < kept < sum(m.weight.numel() for _, m in dynamic_layers(model))
    head = new_head(model, 7, seed=1)
    assert model.fc is head and head.out_features == 7
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p is m.threshold for _, m in dynamic_layers(model) for p in params)
    opt = make_optimizer(TrainCfg(), [(n, p) for n, p in model.named_parameters() if p.requires_grad])
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
    mcfg = ConvertCfg().dynconv
    model, _ = build_method_model("dynconv", ModelCfg(arch="cifar_resnet", depth=14), mcfg, 1, 10, seed=0,
                                  dense=build_model(ModelCfg(arch="cifar_resnet", depth=14), 1, 10))
    blocks = searched_modules(model, "dynconv")
    assert stage_of(model, blocks, torch.randn(2, 1, 32, 32)) == [0, 0, 1, 1, 2, 2]
    sd = sdconv_model()
    assert stage_of(sd, searched_modules(sd, "sdconv"), torch.randn(2, 1, 32, 32)) == [0, 0, 1, 1, 2, 2]


def test_stage_budgets_are_clipped():
    params = {"budget": 0.1, "offset_stage0": -0.15, "offset_stage1": 0.0, "offset_stage2": 0.95}
    assert stage_budgets(params, 3) == pytest.approx([0.05, 0.1, 1.0])


def test_train_subset_is_seeded_and_cycles():
    x, y = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10)
    task = TensorTask({"train": (x, y), "val": (x, y), "test": (x, y)}, [str(i) for i in range(10)], [0.0], [1.0])
    a, b = train_subset(task, 25, seed=4), train_subset(task, 25, seed=4)
    assert torch.equal(a.splits["train"][1], b.splits["train"][1]) and len(a.splits["train"][1]) == 25
    assert sorted(a.splits["train"][1][:10].tolist()) == list(range(10))  # one full pass before repeating
    assert a.splits["val"][1] is y


def test_loaded_dynamic_model_has_the_trained_temperature(tmp_path):
    cfg = parse_config({"model": {"arch": "cifar_resnet", "depth": 8},
                        "convert": {"dynet": {"width": 1.0, "temperature": {"start": 30.0, "end": 2.0, "epochs": 3},
                                              "train": {"epochs": 8}}}})
    model, _ = build_method_model("dynet", cfg.model, cfg.convert.dynet, 1, 10, seed=0, dense=build_model(cfg.model, 1, 10))
    assert all(m.temperature == 30.0 for _, m in dynamic_layers(model))  # as built: the schedule's start
    record = {"in_channels": 1, "num_classes": 10, "meta": {}}
    save_method_model(tmp_path / "m.pt", model, "dynet", cfg, record)
    loaded, _ = load_method_model(tmp_path / "m.pt")
    assert all(m.temperature == 2.0 for _, m in dynamic_layers(loaded))
