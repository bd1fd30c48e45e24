"""Parity with tensors recorded from the authors' code (float64), after loading their state dict."""

import pytest
import torch

import stvit
from conftest import golden_names, to_device

RTOL, ATOL = 1e-7, 1e-9


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", params=golden_names("tiny", "tiny_a", "tiny_b"))
def golden(request, golden_dir, device):
    record = torch.load(golden_dir / f"{request.param}.pt", weights_only=True)
    model = stvit.STViT(**record["config"], qkv_bias=True, drop_path_rate=0.0, init_values=1e-6).double()
    stvit.load_checkpoint(model, record["state_dict"])
    return model.to(device), to_device(record, device)


def cases(record):
    return list(enumerate(record["cases"]))


def test_eval_outputs(golden):
    model, record = golden
    model.eval()
    for i, case in cases(record):
        with torch.no_grad():
            close(model(case["input"]), case["eval_logits"], f"case {i} eval logits")
            stages = model.forward_stages(case["input"], before_downsample=False)
            assert len(stages) == len(case["eval_stage_outputs"])
            for s, (out, ref) in enumerate(zip(stages, case["eval_stage_outputs"])):
                close(out, ref, f"case {i} stage {s} output")
            close(model.layers[0].blocks[0].attn(case["sta_input"]), case["sta_output"],
                  f"case {i} first super token attention")


def test_train_logits_and_gradients(golden):
    model, record = golden
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for i, case in cases(record):
        model.load_state_dict(state)  # a train forward updates BatchNorm running statistics
        model.zero_grad(set_to_none=True)
        x = case["input"].clone().requires_grad_()
        logits = model(x)
        close(logits, case["train_logits"], f"case {i} train logits")
        (logits * case["loss_weights"]).sum().backward()
        close(x.grad, case["grad_input"], f"case {i} input gradient")
        params = dict(model.named_parameters())
        assert set(case["grads"]) == set(params), "gradients recorded for a different parameter set"
        for name, grad in case["grads"].items():
            close(params[name].grad, grad, f"case {i} gradient of {name}")
    model.load_state_dict(state)


def test_official_state_dict_keys_load(golden_dir):
    """Every key and shape of the authors' STViT-S/B/L state dicts loads, and params match exactly."""
    import json

    official = json.loads((golden_dir / "official_state_dict_keys.json").read_text())
    for name, info in official.items():
        model = stvit.create_model(name)
        assert stvit.count_params(model) == info["params"], name
        fake = {k: torch.zeros(shape) for k, shape in info["state_dict"].items()}
        stvit.load_checkpoint(model, {"model": fake})  # strict: raises on any difference
