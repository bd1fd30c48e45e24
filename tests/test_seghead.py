"""The segmentation heads (stvit/segmentation/heads.py): float64 parity with tensors recorded from
MMSegmentation v1.2.2's UPerHead, FCNHead and SegformerHead (../shared/golden/seghead.md), the
papers' full-width parameter counts and state-dict shapes, MMSegmentation's initialisation, and
the configs the heads refuse."""

from __future__ import annotations

import pytest
import torch

from conftest import golden_names, to_device
from stvit.segmentation import FCNHead, SegformerHead, UPerHead, build_head

RTOL, ATOL = 1e-7, 1e-9
HEADS = {"UPerHead": UPerHead, "FCNHead": FCNHead, "SegformerHead": SegformerHead}


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", params=golden_names("seghead", "seghead_a"))
def golden(request, golden_dir):
    return torch.load(golden_dir / f"{request.param}.pt", weights_only=True)


def built(record, device, **changes):
    """The head of ``record`` as its own class builds it from the recorded config, in float64."""
    head = HEADS[record["config"]["type"]].from_mmseg_config({**record["config"], **changes}).double()
    head.load_state_dict(record["state_dict"], strict=True)
    return head.to(device)


@pytest.mark.parametrize("name", HEADS)
def test_eval_logits(golden, name, device):
    record = to_device(golden[name], device)
    head = built(record, device).eval()
    assert sum(p.numel() for p in head.parameters()) == record["num_params"]
    for i, case in enumerate(record["cases"]):
        with torch.no_grad():
            close(head(case["inputs"]), case["eval_logits"], f"{name} case {i} eval logits")


@pytest.mark.parametrize("name", HEADS)
def test_train_logits_gradients_and_batchnorm_buffers(golden, name, device):
    record = to_device(golden[name], device)
    head = built(record, device, dropout_ratio=record["train_dropout_ratio"])
    assert head.dropout is None  # dropout_ratio 0: no module, as MMSegmentation
    for i, case in enumerate(record["cases"]):
        head.load_state_dict(record["state_dict"])  # each case starts from the recorded statistics
        head.train()
        head.zero_grad(set_to_none=True)
        inputs = [x.clone().requires_grad_() for x in case["inputs"]]
        logits = head(inputs)
        close(logits, case["train_logits"], f"{name} case {i} train logits")
        loss = (logits * case["loss_weights"]).sum()
        torch.testing.assert_close(loss, case["loss"], rtol=1e-12, atol=0)
        loss.backward()
        params = dict(head.named_parameters())
        assert set(params) == set(case["grads"])
        for key, grad in case["grads"].items():
            close(params[key].grad, grad, f"{name} case {i} gradient of {key}")
        for k, (x, grad) in enumerate(zip(inputs, case["grad_inputs"])):
            if grad is None:
                assert x.grad is None, f"{name} reads input {k}, which MMSegmentation's never reads"
            else:
                close(x.grad, grad, f"{name} case {i} gradient of input {k}")
        state = head.state_dict()
        for key, value in case["train_buffers"].items():
            close(state[key], value, f"{name} case {i} buffer {key} after one train forward")


@pytest.mark.parametrize("name", HEADS)
def test_full_width_heads_match_mmsegmentation(golden, name):
    """At the papers' widths (UperNet on Swin-T and STViT-S): parameter and buffer counts, and every
    state-dict key and shape in MMSegmentation's order; built on the meta device."""
    for backbone, record in golden[name]["full_size"].items():
        with torch.device("meta"):
            head = build_head(record["config"])
        assert sum(p.numel() for p in head.parameters()) == record["num_params"], backbone
        assert sum(b.numel() for b in head.buffers()) == record["num_buffer_elements"], backbone
        shapes = {k: list(v.shape) for k, v in head.state_dict().items()}
        assert list(shapes) == list(record["state_dict_shapes"]), f"{backbone}: key order"
        assert shapes == {k: list(v) for k, v in record["state_dict_shapes"].items()}, backbone


def test_upernet_on_stvit_s_has_the_papers_head_size(golden):
    """seghead.md: UperNet's two heads on STViT-S hold 30,487,852 parameters (Swin-T: 32,421,164)."""
    for backbone, total in (("stvit_s", 30_487_852), ("swin_t", 32_421_164)):
        assert golden["UPerHead"]["full_size"][backbone]["num_params"] + \
            golden["FCNHead"]["full_size"][backbone]["num_params"] == total


def test_initialisation_is_mmsegmentations(golden):
    """Constants exactly, random weights by their standard deviation (SegformerHead at full width:
    the 1×1 convs into 256 channels are N(0, 2/256), conv_seg N(0, 0.01²))."""
    record = golden["SegformerHead"]["full_size"]["stvit_s"]
    torch.manual_seed(0)
    head = build_head(record["config"])
    state = head.state_dict()
    for key, (mean, std) in record["init_stats"].items():
        value = state[key].double()
        if float(std) == 0:
            assert torch.all(value == float(mean)), key
        else:
            assert abs(float(value.std()) - float(std)) < 0.05 * float(std), key
            assert abs(float(value.mean())) < 3 * float(std) / value.numel() ** 0.5 + 1e-12, key


@pytest.mark.parametrize("change, message", [
    (dict(type="PSPHead"), "this is UPerHead"),
    (dict(norm_cfg={"type": "GN", "num_groups": 4}), "only BatchNorm"),
    (dict(loss_decode={"type": "DiceLoss"}), "CrossEntropyLoss"),
    (dict(sampler={"type": "OHEMPixelSampler"}), "no pixel sampler"),
    (dict(input_transform="multiple_select"), "does not take"),
])
def test_configs_it_does_not_implement_are_refused(golden, change, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        UPerHead.from_mmseg_config({**golden["UPerHead"]["config"], **change})
