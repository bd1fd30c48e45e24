"""Hypothesis: the sparse torch super token attention equals the dense NumPy oracle."""

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference
from stvit.models import stvit as stvit_module
from stvit.models.stvit import SuperTokenAttention, gather_neighbours, scatter_neighbours

FORMS = ("cells", "map")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    return dict(
        B=draw(st.integers(1, 3)),
        heads=heads,
        C=heads * draw(st.integers(1, 48 // heads)),
        H=draw(st.integers(1, 40)),
        W=draw(st.integers(1, 40)),
        grid=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        n_iter=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(cfg):
    torch.manual_seed(cfg["seed"])
    module = SuperTokenAttention(cfg["C"], cfg["grid"], cfg["n_iter"], cfg["heads"]).double()
    for p in module.parameters():  # random, not the default init, so biases matter too
        torch.nn.init.normal_(p, std=0.3)
    params = {k: v.detach().numpy() for k, v in module.stoken_refine.state_dict().items()}
    x = np.random.default_rng(cfg["seed"]).standard_normal((cfg["B"], cfg["C"], cfg["H"], cfg["W"]))
    return module, params, x


@SETTINGS
@given(configs())
def test_sparse_equals_dense_oracle(device, cfg):
    """Both token forms: "cells" (batched GEMMs, eager) and "map" (broadcast products, compiled)."""
    module, params, x = build(cfg)
    expected = reference.super_token_attention(x, params, cfg["grid"], cfg["n_iter"], cfg["heads"])
    module.to(device)
    for form in FORMS:
        with torch.no_grad():
            out = module(torch.from_numpy(x).to(device), form=form).cpu().numpy()
        assert out.shape == x.shape
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9, err_msg=f"form={form}")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs().filter(lambda c: c["H"] * c["W"] * c["C"] <= 1500))
def test_input_gradient_equals_finite_differences_with_fixed_association(device, cfg):
    module, params, x = build(cfg)
    weights = np.random.default_rng(cfg["seed"] + 1).standard_normal(x.shape)
    module.to(device)
    grads = {}
    for form in FORMS:
        xt = torch.from_numpy(x).to(device).requires_grad_()
        (module(xt, form=form) * torch.from_numpy(weights).to(device)).sum().backward()
        grads[form] = xt.grad.cpu().numpy()

    A = reference.super_token_association(x, cfg["grid"], cfg["n_iter"])  # held fixed, as in the model
    def loss(v):
        return (reference.super_token_attention(v, params, cfg["grid"], cfg["n_iter"], cfg["heads"],
                                                association_matrix=A) * weights).sum()
    eps = 1e-6
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        grad[idx] = (loss(x + step) - loss(x - step)) / (2 * eps)
    for form in FORMS:
        np.testing.assert_allclose(grads[form], grad, rtol=1e-5, atol=1e-7, err_msg=f"form={form}")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 5]), st.integers(0, 2**31 - 1))
def test_neighbour_gather_and_scatter_by_index_equal_the_shifted_views(B, hh, ww, C, seed):
    """Eagerly on a CPU the neighbours move with one index op each way; compiled, exported, traced
    or on CUDA with nine shifted views, which compiled training differentiates by each other (the
    adjoint pair). All ways give the same gather, the same scatter, the same gradients, and the
    scatter is the gather's adjoint: <gather(g), s> = <g, scatter(s)>."""
    rng = np.random.default_rng(seed)
    grid = torch.from_numpy(rng.standard_normal((B, hh, ww, C))).requires_grad_()
    slots = torch.from_numpy(rng.standard_normal((B, hh, ww, 9, C))).requires_grad_()
    weights = [torch.from_numpy(rng.standard_normal(s.shape)) for s in (slots, grid)]
    results = {}
    # "adjoints": the views, each carrying the other as its backward (what torch.compile trains with).
    for way, one_op, adjoint in (("index", True, False), ("views", False, False), ("adjoints", False, True)):
        with (mock.patch.object(stvit_module, "_one_index_op", lambda t, one_op=one_op: one_op),
              mock.patch.object(stvit_module, "_compiled_with_grad", lambda t, adjoint=adjoint: adjoint)):
            gathered, scattered = gather_neighbours(grid), scatter_neighbours(slots)
        grid.grad = slots.grad = None
        ((gathered * weights[0]).sum() + (scattered * weights[1]).sum()).backward()
        results[way] = (gathered.detach(), scattered.detach(), grid.grad, slots.grad)
    for other in ("views", "adjoints"):
        for name, a, b in zip(("gather", "scatter", "gather's gradient", "scatter's gradient"),
                              results["index"], results[other]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{other}: {name}")
    gathered, scattered = results["index"][:2]
    torch.testing.assert_close((gathered * slots).sum(), (grid * scattered).sum(), rtol=1e-12, atol=1e-12)
    assert stvit_module._one_index_op(grid)  # what the model itself takes here, eagerly on a CPU


def test_adjoint_pair_has_exact_second_derivatives_and_works_under_torch_func():
    """The pair's backward is itself differentiable (double backward, as gradient penalties take)
    and torch.func's vmap and grad pass through it."""
    rng = np.random.default_rng(0)
    grid = torch.from_numpy(rng.standard_normal((2, 3, 4, 5))).requires_grad_()
    slots = torch.from_numpy(rng.standard_normal((2, 3, 4, 9, 5))).requires_grad_()
    gather, scatter = stvit_module._GatherNeighbours.apply, stvit_module._ScatterNeighbours.apply
    assert torch.autograd.gradcheck(gather, (grid,)) and torch.autograd.gradgradcheck(gather, (grid,))
    assert torch.autograd.gradcheck(scatter, (slots,)) and torch.autograd.gradgradcheck(scatter, (slots,))
    grids = torch.from_numpy(rng.standard_normal((3, 2, 3, 4, 5)))  # vmap over a stack of batches
    torch.testing.assert_close(torch.func.vmap(gather)(grids), torch.stack([gather(g) for g in grids]))
    weights = torch.from_numpy(rng.standard_normal(slots.shape))
    grad = torch.func.grad(lambda g: (gather(g) * weights).sum())(grid.detach())
    torch.testing.assert_close(grad, scatter(weights), rtol=0, atol=1e-12)


def test_compiled_training_takes_the_adjoint_pair_and_inference_does_not():
    """Under torch.compile with autograd the gather and scatter are the adjoint pair (one autograd
    Function each in dynamo's graph); under no_grad, and eagerly, plain ops."""
    module = SuperTokenAttention(8, (2, 2), 1, 2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(1, 8, 6, 6)
    compiled = torch.compile(module, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(x)
    compiled(x.requires_grad_())
    pairs = [sum(node.target is torch.ops.higher_order.autograd_function_apply for node in gm.graph.nodes)
             for gm in graphs]
    # Training: the scatter of the pooled tokens and the gather of the refined super tokens (the
    # association runs without gradient, its neighbours as plain views).
    assert pairs == [0, 2], pairs


def test_oracle_phantom_slots_take_part_in_softmax():
    """A single cell has 8 phantom neighbours: its tokens give it exactly 1/(1 + 8·e^{-l}) each."""
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2))
    A = reference.super_token_association(x, 2, 1)
    S = x.reshape(4, 4).mean(1)
    logits = x.reshape(4, 4).T @ S / 2.0
    np.testing.assert_allclose(A[0, :, 0], np.exp(logits) / (np.exp(logits) + 8))


def test_unknown_form_is_a_clear_error():
    module = SuperTokenAttention(8, (2, 2), 1, 2)
    with pytest.raises(ValueError, match=r"form='dense'.*'cells', 'map'"):
        module(torch.zeros(1, 8, 4, 4), form="dense")
