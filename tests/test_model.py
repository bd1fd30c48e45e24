"""STViT-S/B/L sizes, the model registry, checkpoint loading and clear errors."""

from unittest import mock

import pytest
import torch

import stvit
from stvit import compat
from stvit.models import stvit as stvit_module
from stvit.models.stvit import SuperTokenAttention

# The authors' parameter counts (official_state_dict_keys.json) and the paper's MACs at 224².
PAPER = {"stvit_small": (25_495_624, 4.35e9), "stvit_base": (51_691_288, 9.84e9),
         "stvit_large": (94_971_096, 15.56e9)}


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_macs_match_the_paper(name):
    model = stvit.create_model(name)
    params, macs = PAPER[name]
    assert stvit.count_params(model) == params
    assert abs(stvit.count_macs(model, (3, 224, 224)) / macs - 1) < 0.01


def test_registry_aliases_and_unknown_name():
    assert stvit.list_models("stvit") == ["stvit_tiny", "stvit_small", "stvit_base", "stvit_large"]
    assert stvit.resolve_name("SMALL") == stvit.resolve_name("stvit-small") == "stvit_small"
    assert stvit.create_model("small").embed_dim == stvit.create_model("stvit_small").embed_dim
    with pytest.raises(ValueError, match="unknown model 'stvit_huge'.*stvit_small"):
        stvit.create_model("stvit_huge")


def test_overrides_reach_the_model():
    model = stvit.create_model("tiny", num_classes=7, drop_path_rate=0.2)
    assert model.head.out_features == 7
    assert max(m.p for m in model.modules() if isinstance(m, stvit.contract.DropPath)) == pytest.approx(0.2)


def authors_release(model):
    """A state dict shaped like the authors' release files: constant unfold/fold kernels included."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, SuperTokenAttention):
            eye = torch.eye(9).reshape(9, 1, 3, 3)
            state[f"{name}.unfold.weights"] = eye
            state[f"{name}.fold.weights"] = eye
    return state


@pytest.mark.parametrize("wrap", ["bare", "model", "model_ema", "ddp_prefix"])
def test_load_checkpoint_accepts_release_formats(wrap, tmp_path):
    source = stvit.create_model("tiny").eval()
    state = authors_release(source)
    obj = {"bare": state, "model": {"model": state, "epoch": 3}, "model_ema": {"model_ema": state},
           "ddp_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    target = stvit.load_checkpoint(stvit.create_model("tiny").eval(), tmp_path / "ckpt.pth")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_load_checkpoint_reports_every_mismatch_at_once():
    state = dict(stvit.create_model("tiny").state_dict())
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(3, 256)
    with pytest.raises(stvit.CheckpointError) as err:
        stvit.load_checkpoint(stvit.create_model("tiny"), state)
    message = str(err.value)
    for expected in ("1 missing", "1 unexpected", "1 mis-shaped", "head.bias", "extra.weight", "head.weight",
                     "3×256", "1000×256"):
        assert expected in message


def test_invalid_input_errors_name_the_argument():
    model = stvit.create_model("tiny").eval()
    with pytest.raises(ValueError, match=r"4-D.*got \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="1 channels.*in_chans=3"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"n_iter\[1\]=0"):
        stvit.create_model("tiny", n_iter=[1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"embed_dim\[0\]=32 is not divisible by num_heads\[0\]=3"):
        stvit.create_model("tiny", num_heads=[3, 2, 4, 5])
    with pytest.raises(ValueError, match="num_heads=5 must divide.*dim=32"):
        SuperTokenAttention(32, (4, 4), 1, num_heads=5)
    with pytest.raises(ValueError, match="n_iter=0"):
        SuperTokenAttention(32, (4, 4), n_iter=0)
    with pytest.raises(ValueError, match="depths has 4 stages"):
        stvit.create_model("tiny", num_heads=[1, 2])


def test_grad_checkpointing_gives_the_same_gradients_and_running_stats():
    torch.manual_seed(0)
    model = stvit.create_model("tiny").double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    grads, buffers = [], []
    for enable in (False, True):
        model.load_state_dict(initial)
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        buffers.append({k: v.clone() for k, v in model.named_buffers()})
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # Recomputation in backward must not update BatchNorm running statistics a second time.
    torch.testing.assert_close(buffers[0], buffers[1], rtol=0, atol=0)
    assert stvit.create_model("large").default_checkpoint_num == [4, 7, 15, 0]


@pytest.mark.skipif(not compat.onednn_conv_gelu_works(), reason="this torch build has no oneDNN conv with a GELU post-op")
def test_eager_cpu_inference_fuses_gelu_into_the_conv_and_nothing_else_does():
    """Eval, no autograd, float32 on a CPU: every conv -> GELU (the stem's 4, each block's fc1) is one
    oneDNN conv with a GELU post-op, with the logits of the two separate ops; with autograd, autocast,
    another dtype, under torch.fx or a dispatch mode (a FLOP counter), with a hook on either module
    or for a Conv2d subclass it is the two ops."""
    torch.manual_seed(0)
    model = stvit.create_model("tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []

    def counted(conv, x):
        calls.append(conv)
        return fused(conv, x)

    fused = stvit_module._onednn_conv_gelu
    expected = model(x)  # autograd on: conv, then GELU
    assert calls == []
    with mock.patch.object(stvit_module, "_onednn_conv_gelu", counted):
        with torch.no_grad():
            got = model(x)
        blocks = sum(1 for m in model.modules() if isinstance(m, stvit_module.ConvMlp))
        assert len(calls) == 4 + blocks
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        calls.clear()
        with torch.no_grad():
            with torch.autocast("cpu", torch.bfloat16):
                model(x)
            model.double()(x.double())
        torch.fx.symbolic_trace(model.float())
        assert stvit.count_macs(model, (3, 64, 64)) > 0  # under a FLOP counter's dispatch mode
        assert calls == []
        # A hook on either module sees it run; a Conv2d subclass keeps its own forward.
        seen = []
        mlp = next(m for m in model.modules() if isinstance(m, stvit_module.ConvMlp))
        handle = mlp.act1.register_forward_hook(lambda *args: seen.append("act1"))

        class Scaled(torch.nn.Conv2d):
            def forward(self, x):
                return 2 * super().forward(x)

        stem_conv = model.patch_embed.proj[0]
        model.patch_embed.proj[0] = Scaled(stem_conv.in_channels, stem_conv.out_channels, 3, 2, 1)
        with torch.no_grad():
            model(x)
        handle.remove()
        assert seen == ["act1"] and len(calls) == 4 + blocks - 2


def test_the_package_has_no_import_cycle():
    """Every import inside stvit/ (top-level or inside a function) points one way: the registry and
    the contract at the bottom, the families above them, create_model and the tools on top."""
    import ast
    from pathlib import Path

    root = Path(stvit.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = ".".join(("stvit",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names]
                edges.update(n for n in names + [target] if n != module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stvit"):
                edges.add(node.module)
    graph = {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}
    # A package's __init__ may import its own submodules (that is what it is for); other cycles not.
    for m in graph:
        graph[m] = {e for e in graph[m] if not e.startswith(m + ".")}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"import cycle through {cycles}"


def test_python_m_stvit_summarises_any_model_and_refuses_a_size_clearly(capsys):
    from stvit.__main__ import main

    assert main(["--model", "sgformer_tiny"]) == 0
    out = capsys.readouterr().out
    assert "sgformer_tiny" in out and "(1, 3, 56, 56)" in out and f"{stvit.count_params(stvit.create_model('sgformer_tiny')):,}" in out
    assert main(["--model", "sgformer_tiny", "--input-size", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "56" in err and "Traceback" not in err
