"""stvit.optimize: exact BatchNorm folding, outputs equal to eager, compiled blocks for training.

Tolerances: float32 paths agree with the eager float32 model to 1e-4 of the logits' scale (float32
rounding through ~20 layers with reordered sums); bf16 autocast to 5e-2 of the scale (8-bit
mantissa); BatchNorm folding in float64 to 1e-10.
"""

import copy

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stvit
from stvit import compat, precision
from stvit.models.stvit import ResidualDepthwiseConv
from stvit.optimize import CPU_INFERENCE_OPTIONS, OptimizedModel, fold_bn_conv, fold_conv_bn, optimize

FP32_TOL = 1e-4
BF16_TOL = 5e-2

# Smaller than stvit_tiny: as few distinct kernels as possible, because torch.compile is slow.
MICRO = dict(embed_dim=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], stoken_size=[2, 2, 1, 1],
             projection=32, num_classes=5, drop_path_rate=0.0)


def randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def micro_model(device: torch.device | str = "cpu", **overrides) -> stvit.STViT:
    torch.manual_seed(0)
    return randomize_batchnorms(stvit.STViT(**{**MICRO, **overrides})).eval().to(device)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = ref.abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} × scale {scale:.3g}"


def test_fold_batchnorms_is_exact_in_float64():
    model = micro_model(layerscale=[False, False, True, True]).double()
    folded = copy.deepcopy(model)
    names = [n for n in folded.prepare_inference() if not n.endswith("(identity)")]
    # Every Downsample BN, every block's norm2, the head norm; the stem's BNs are not foldable.
    assert names == ["layers.0.blocks.0.norm2", "layers.0.downsample.proj.1", "layers.1.blocks.0.norm2",
                     "layers.1.downsample.proj.1", "layers.2.blocks.0.norm2", "layers.2.downsample.proj.1",
                     "layers.3.blocks.0.norm2", "norm"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 4  # the stem's
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)


def test_fold_helpers_match_the_layers_they_replace():
    torch.manual_seed(0)
    bn = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(6))).eval().double()[0]
    conv = nn.Conv2d(4, 6, 3, 2, 1).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=0, atol=1e-12)
        conv1 = nn.Conv2d(6, 5, 1).double()
        y = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(fold_bn_conv(bn, conv1)(y), conv1(bn(y)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unpadded"):
        fold_bn_conv(bn, nn.Conv2d(6, 5, 3, padding=1))  # the padded border would change


def test_residual_depthwise_identity_folds_into_the_kernel():
    torch.manual_seed(0)
    layer = ResidualDepthwiseConv(6).double()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = x + layer.conv(x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        layer.fold_identity()
        layer.fold_identity()  # a second call must not add the identity twice
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    fast = optimize(micro_model(), compile=False)
    layers = [m for m in fast.modules() if isinstance(m, ResidualDepthwiseConv)]
    assert len(layers) == 8 and all(m.identity_folded for m in layers)


def test_fold_needs_eval_mode():
    with pytest.raises(ValueError, match="eval"):
        micro_model().train().prepare_inference()


def test_optimize_leaves_the_callers_model_alone():
    model = micro_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, compile=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.norm, nn.BatchNorm2d)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_optimized_eager_matches_the_model(dtype, tol, device):
    model = micro_model(device)
    fast = optimize(model, dtype, compile=False)
    for shape in [(2, 3, 64, 64), (1, 3, 45, 37)]:  # odd sizes: padded super-token grids
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            ref = model(x)
        out = fast(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert_close_to(out, ref, tol)


def test_optimized_features_only_backbone(device):
    model = micro_model(device, features_only=True, out_indices=(1, 3))
    x = torch.randn(1, 3, 40, 48, device=device)
    with torch.no_grad():
        refs = model(x)
    outs = optimize(model, compile=False)(x)
    assert len(outs) == 2
    for out, ref in zip(outs, refs):
        assert_close_to(out, ref, FP32_TOL)


def test_optimize_rejects_bad_arguments():
    model = micro_model()
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"):
        optimize(model, torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        optimize(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="already optimized"):
        optimize(optimize(model, compile=False))
    with pytest.raises(ValueError, match="4-D"):
        optimize(model, compile=False)(torch.randn(3, 32, 32))


def two_stage_micro_model(device: torch.device | str = "cpu") -> stvit.STViT:
    """A super-token stage and a global-attention stage: the fewest kernels to compile."""
    return micro_model(device, embed_dim=[8, 16], depths=[1, 1], num_heads=[1, 2], stoken_size=[2, 1], n_iter=1,
                       layerscale=False, checkpoint_num=0, projection=16)


# Shapes A, B, then A and B again.
TWO_SHAPES = [(2, 3, 32, 32), (1, 3, 36, 28), (2, 3, 32, 32), (1, 3, 36, 28)]


def check_compiled_per_shape(model: nn.Module, fast: OptimizedModel, device: torch.device, tol: float,
                             shapes: list[tuple[int, ...]] = TWO_SHAPES) -> None:
    """Each input shape gets its own graph (on CUDA: its own CUDA graph); going back to a shape reuses
    that shape's graph, never another's; fresh inputs give fresh, correct outputs every call."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    outputs = []
    for shape in shapes:
        x = torch.randn(shape, device=device)  # new data each call: a stale replay would show
        with torch.no_grad():
            ref = model(x)
        out = fast(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert_close_to(out, ref, tol)
        outputs.append((out, out.clone()))
    assert counters["stats"]["unique_graphs"] - graphs == len(set(shapes)), "one compilation per input shape, no more"
    for out, copy_then in outputs:  # a later replay never overwrote an output already returned
        assert torch.equal(out, copy_then)


def test_compiled_matches_eager_and_recompiles_for_a_new_shape(device, monkeypatch):
    torch._dynamo.reset()
    model = two_stage_micro_model(device)
    # A family's own inductor options (the contract's inference_compile_options, LVT's) join optimize's.
    model.inference_compile_options = {"layout_optimization": False}
    fast = optimize(model)  # fp32, torch.compile (CPU: with weight freezing; CUDA: + CUDA graphs)
    assert fast.cuda_graphs == (device.type == "cuda")
    # On a CPU every compilation runs with those options (torch.compile(options=...) would not reach
    # freezing): what inductor's config says when its entry point is called.
    from torch._inductor import compile_fx, config
    expected = {**CPU_INFERENCE_OPTIONS, "layout_optimization": False}
    seen, depth = [], 0
    entry = compile_fx.compile_fx

    def recording(*args, **kwargs):
        # The outermost call only: torch 2.6's C++ wrapper compiles a graph twice, the first time
        # from within the call with its own options (its Python wrapper, to tune the kernels).
        nonlocal depth
        if not depth:
            seen.append({key: getattr(config, key) for key in expected})
        depth += 1
        try:
            return entry(*args, **kwargs)
        finally:
            depth -= 1

    monkeypatch.setattr(compile_fx, "compile_fx", recording)
    check_compiled_per_shape(model, fast, device, FP32_TOL)
    if device.type == "cpu":
        assert len(seen) == len(set(TWO_SHAPES)) and all(s == expected for s in seen), seen


def test_compiled_bf16_matches_eager_fp32(device):
    """What ``bench throughput`` times as compiled-bf16: bf16 autocast + torch.compile (+ CUDA graphs
    on CUDA), against the eager float32 model, within the bf16 tolerance. One shape, called twice
    (a new shape recompiling is the float32 test's; another bf16 graph costs half a minute on a CPU)."""
    if not precision.native_bf16(device):
        pytest.skip(f"bf16 is emulated on this {device.type} (compiling it takes minutes); run with --device cuda")
    torch._dynamo.reset()
    model = two_stage_micro_model(device)
    fast = optimize(model, torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and fast.cuda_graphs == (device.type == "cuda")
    check_compiled_per_shape(model, fast, device, BF16_TOL, shapes=TWO_SHAPES[:1] * 2)


class ConvBackwardLayouts(TorchDispatchMode):
    """Records the layout of the output gradient and the input of every ``convolution_backward`` run
    (a compiled graph calls it from its wrapper, through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.layouts: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.layouts += ["channels-last" if t.is_contiguous(memory_format=torch.channels_last) else
                             "contiguous" if t.is_contiguous() else f"other {t.stride()}" for t in args[:2]]
        return func(*args, **(kwargs or {}))


def test_compiled_block_trains_like_the_eager_block(device):
    """A block compiled as ``train --compile`` compiles it: no graph breaks, same outputs and gradients,
    and its backward convolutions get maps in one of the two layouts oneDNN runs fast (torch 2.13's
    inductor would lay a depthwise conv's maps out in a third order and copy them into it; stvit/compat.py)."""
    from train.distributed import compile_block

    torch._dynamo.reset()
    model = micro_model(device).train()
    block = model.layers[0].blocks[0]  # a super token attention block (2×2 cells)
    # Odd sides: the padded-grid path; channels-last, as the model hands maps to its blocks.
    x = torch.randn(2, 8, 11, 9, device=device).contiguous(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = copy.deepcopy(block)
    compile_block(block)
    for _ in range(2):  # the second step runs the graphs the first compiled
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = block(xa), eager(xb)
        assert_close_to(out, ref, FP32_TOL)
        weights = torch.randn_like(ref)
        block.zero_grad()
        eager.zero_grad()
        with ConvBackwardLayouts() as compiled_layouts:
            (out * weights).sum().backward()
        with ConvBackwardLayouts() as eager_layouts:
            (ref * weights).sum().backward()
        assert_close_to(xa.grad, xb.grad, FP32_TOL)
        for p, q in zip(block.parameters(), eager.parameters()):
            assert_close_to(p.grad, q.grad, FP32_TOL)
    # On this small map the four 1×1 convs train as Linear layers, eagerly and compiled: the two
    # depthwise convs remain (two tensors each).
    assert len(compiled_layouts.layouts) == len(eager_layouts.layouts) == 2 * 2
    assert all(layout in ("channels-last", "contiguous") for layout in compiled_layouts.layouts), \
        compiled_layouts.layouts


class CountConvs(TorchDispatchMode):
    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.convolution.default
        return func(*args, **(kwargs or {}))


def test_cpu_training_runs_small_maps_1x1_convs_as_linear_layers():
    """CPU training, eager and compiled, runs the blocks' 1×1 convs as Linear layers on maps of at
    most 14×14 positions (qkv, proj, fc1, fc2; faster backward there, bench/RESULTS.md) and as
    convolutions on larger maps and in inference. The two depthwise convs stay convolutions."""
    from stvit.models.stvit import LINEAR_MAX_POSITIONS

    block = micro_model().layers[2].blocks[0].train()  # global attention (1×1 grid): four 1×1 convs
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, dynamic=False)
    dim, side = block.norm2.num_features, int(LINEAR_MAX_POSITIONS ** 0.5)
    for size, grad, linears in [(side, True, 4), (side, False, 0), (side + 1, True, 0)]:
        x = torch.randn(1, dim, size, size).contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(grad):
            compiled(x)
            with CountConvs() as eager:
                block(x)
        targets = [node.target for node in graphs[-1].graph.nodes if node.op == "call_function"]
        assert (targets.count(torch._C._nn.linear), targets.count(torch.conv2d)) == (linears, 6 - linears), (size, grad)
        assert eager.count == 6 - linears, (size, grad)


def test_train_compile_keeps_every_block_shape_compiled():
    """``train --compile``: both stages' blocks (one code object) × 5 shapes and modes are 10 graphs,
    past dynamo's default limit of 8 per code, beyond which blocks would run eagerly, silently slow."""
    from torch._dynamo.utils import counters

    from train.distributed import DistEnv, prepare_model

    torch._dynamo.reset()
    # From dynamo's default limit (monkeypatch cannot restore a torch config entry; patch() can).
    # Backend eager: dynamo's graphs only (the limit is dynamo's; inductor is slow here).
    with compat.dynamo_config(recompile_limit=8):
        model = prepare_model(two_stage_micro_model().train(), DistEnv(), compile_blocks=True,
                              compile_backend="eager")
        graphs = counters["stats"]["unique_graphs"]
        for training, batch in [(True, 4), (True, 3), (True, 2), (False, 5), (False, 1)]:
            model.train(training)
            with torch.set_grad_enabled(training):
                model(torch.randn(batch, 3, 32, 32))
    assert counters["stats"]["unique_graphs"] - graphs == 2 * 5


def test_optimized_model_records_what_the_family_folded():
    model = micro_model()
    fast = optimize(model, compile=False)
    assert isinstance(fast, OptimizedModel)
    assert fast.folded == copy.deepcopy(model).prepare_inference()
    assert sum(n.endswith("(identity)") for n in fast.folded) == 8  # every residual depthwise conv
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 4  # only the stem's are left
    unfolded = optimize(model, compile=False, fold=False)
    assert unfolded.folded == [] and sum(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules()) == 12


def test_one_precision_notion_and_the_emulated_bf16_warning(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == torch.float32 and precision.resolve("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision.resolve("fp16", cpu)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(precision.EmulatedBF16Warning, match="emulated"):
        fast = optimize(micro_model(), "bf16", compile=False)
    assert fast.dtype == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.EmulatedBF16Warning)
        assert optimize(micro_model(), torch.bfloat16, compile=False).dtype == torch.bfloat16
