"""``stvit.visualize``: super-token colouring and effective attention, checked against the dense
NumPy oracle (``reference``) computed independently here from the block's attention input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import reference
import stvit
from stvit import visualize as vis

MEAN, STD = np.array(stvit.IMAGENET_MEAN), np.array(stvit.IMAGENET_STD)


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture with a distinct block, so super tokens have something to follow.

    Light noise everywhere: no two super tokens tie exactly (ties could break differently in
    the oracle's and the tool's float arithmetic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in rng.uniform(0, 3, 3)], -1) * 100 + 128
    img[height // 3: 2 * height // 3, width // 4: width // 2] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def normalised(img: Image.Image) -> torch.Tensor:
    x = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1)).float()[None]


def attn_input(model: stvit.STViT, x: torch.Tensor, stage: int, block: int = 0) -> np.ndarray:
    """The input of ``model.layers[stage].blocks[block].attn`` (0-based stage), via our own hook."""
    seen = []
    handle = model.layers[stage].blocks[block].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0].double().numpy()


def oracle_labels(x: np.ndarray, attn) -> np.ndarray:
    """Per-token argmax of the oracle's dense association, on the unpadded token map."""
    H, W = x.shape[-2:]
    h, w = attn.stoken_size
    A = reference.super_token_association(x, attn.stoken_size, attn.n_iter)[0]
    return A.argmax(-1).reshape(H + (-H % h), W + (-W % w))[:H, :W]


def oracle_effective_attention(x: np.ndarray, attn, anchor: tuple[int, int]) -> np.ndarray:
    """Row ``anchor`` of A · Attn · Âᵀ, all dense: Attn is the head-averaged softmax(q kᵀ/√d) among
    the super tokens S = Âᵀ X, Â the column-normalised association."""
    H, W = x.shape[-2:]
    h, w = attn.stoken_size
    Hp, Wp = H + (-H % h), W + (-W % w)
    A = reference.super_token_association(x, attn.stoken_size, attn.n_iter)[0]
    X = reference.tokens(reference.pad_to_grid(x, attn.stoken_size))[0]
    S = reference.update_super_tokens(X[None], A[None])[0]
    C, heads = S.shape[1], attn.stoken_refine.num_heads
    params = {k: v.double().numpy() for k, v in attn.stoken_refine.state_dict().items()}
    qkv = (S @ params["qkv.weight"].reshape(3 * C, C).T + params["qkv.bias"]).reshape(len(S), heads, 3, -1)
    q, k = qkv[:, :, 0].transpose(1, 0, 2), qkv[:, :, 1].transpose(1, 0, 2)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(C // heads)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    Attn = (probs / probs.sum(-1, keepdims=True)).mean(0)
    A_hat = A / (A.sum(0, keepdims=True) + 1e-12)
    row = (A @ Attn @ A_hat.T)[anchor[0] * Wp + anchor[1]]
    return row.reshape(Hp, Wp)[:H, :W]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Two sampling iterations in stages 1-2, so the iterative update is exercised too.
    return stvit.create_model("stvit_tiny", n_iter=[2, 2, 1, 1]).eval()


@pytest.mark.parametrize("size", [(45, 61), (64, 40)])
def test_labels_and_effective_attention_match_the_oracle(model, size):
    img = scene(*size)
    x = normalised(img)
    maps = vis.analyse(model, x, stages=(1, 2))
    for stage0, m in enumerate(maps):
        attn = model.layers[stage0].blocks[0].attn
        inp = attn_input(model, x, stage0)
        assert m.token_hw == inp.shape[-2:]
        assert m.stride == 4 * 2 ** stage0
        labels = m.labels()
        np.testing.assert_array_equal(labels, oracle_labels(inp, attn))
        assert len(np.unique(labels)) > 1
        for anchor in [(0, 0), (m.token_hw[0] // 2, m.token_hw[1] - 1)]:
            np.testing.assert_allclose(m.effective_attention(anchor), oracle_effective_attention(inp, attn, anchor),
                                       rtol=1e-9, atol=1e-12)


def test_labels_ignore_the_zero_slots_outside_the_grid(model):
    # A corner token pointing away from all its real neighbours gives the outside-the-grid zero
    # slots (logit 0) the largest weight; its label must still be a real super token, as the
    # oracle's argmax over the dense (N, M) association is.
    attn = model.layers[0].blocks[0].attn
    C, (h, w) = attn.dim, attn.stoken_size
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(C, generator=gen)
    x = direction[:, None, None] + 0.1 * torch.randn(C, 3 * h, 3 * w + 1, generator=gen)
    x[:, 0, 0] = -direction
    maps = vis.super_token_maps(attn, x[None])
    outside = maps.neighbours[0] < 0
    assert maps.association[0, 0][outside].max() > maps.association[0, 0][~outside].max()
    np.testing.assert_array_equal(maps.labels(), oracle_labels(x[None].double().numpy(), attn))


def test_png_colouring_is_the_oracle_argmax(model, tmp_path):
    # The CLI's picture, read back from disk: every pixel off the drawn lines is the image
    # blended with the palette colour of the oracle's most-associated super token.
    torch.manual_seed(1)
    tiny = stvit.create_model("stvit_tiny").eval()
    ckpt = tmp_path / "tiny.pth"
    stvit.save_state_dict(tiny.state_dict(), ckpt)
    img = scene(70, 53, seed=3)
    img.save(tmp_path / "scene.png")
    code = vis.main([str(tmp_path / "scene.png"), "--model", "tiny", "--checkpoint", str(ckpt),
                     "--out", str(tmp_path / "out"), "--size", "0", "--device", "cpu"])
    assert code == 0
    for stage0 in (0, 1):
        png = Image.open(tmp_path / "out" / f"scene_stage{stage0 + 1}_super_tokens.png")
        assert png.width >= 70 and png.height > 53  # the picture, then a caption strip
        assert png.text["Weights"] == str(ckpt)
        drawn = np.asarray(png.convert("RGB"))[:53, :70].astype(int)

        attn = tiny.layers[stage0].blocks[0].attn
        stride = 4 * 2 ** stage0
        labels = oracle_labels(attn_input(tiny, normalised(img), stage0), attn)
        grid_w = -(-labels.shape[1] // attn.stoken_size[1])
        per_pixel = np.repeat(np.repeat(labels, stride, 0), stride, 1)[:53, :70]
        colour = vis.PALETTE[(per_pixel // grid_w % 3) * 3 + per_pixel % grid_w % 3]
        expected = ((1 - vis.COLOUR_ALPHA) * np.asarray(img, float) + vis.COLOUR_ALPHA * colour).round()

        plain = np.ones(per_pixel.shape, dtype=bool)  # not on a label boundary or a grid line
        plain[:, :-1] &= per_pixel[:, 1:] == per_pixel[:, :-1]
        plain[:-1, :] &= per_pixel[1:, :] == per_pixel[:-1, :]
        cell_h, cell_w = attn.stoken_size[0] * stride, attn.stoken_size[1] * stride
        plain[cell_h::cell_h, :] = False
        plain[:, cell_w::cell_w] = False
        assert plain.mean() > 0.5
        np.testing.assert_array_equal(drawn[plain], expected[plain])
        assert (drawn[~plain] != expected[~plain]).any(axis=-1).any()  # lines are really drawn


def test_random_weights_are_announced_on_the_images(tmp_path, capsys):
    scene(48, 40).save(tmp_path / "img.png")
    code = vis.main([str(tmp_path / "img.png"), "--model", "tiny", "--out", str(tmp_path), "--size", "0",
                     "--anchor", "10", "30", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "random weights" in err
    written = sorted(p.name for p in tmp_path.glob("img_stage*.png"))
    assert written == ["img_stage1_attention.png", "img_stage1_super_tokens.png",
                       "img_stage2_attention.png", "img_stage2_super_tokens.png"]
    assert sorted(line.rsplit("/", 1)[-1] for line in out.split()) == written
    for name in written:
        png = Image.open(tmp_path / name)
        assert png.text["Weights"] == vis.RANDOM_WEIGHTS_NOTE
        caption = np.asarray(png.convert("RGB"))[40:].reshape(-1, 3)
        assert (caption == (255, 70, 70)).all(-1).sum() > 20  # the red warning line is drawn


def test_the_anchor_is_marked_where_asked(model):
    img = scene(64, 48)
    picture = vis.visualize(model, img, stages=(1,), anchor=(50, 12))["stage1_attention"]
    drawn = np.asarray(picture)[:48, :64]
    marked = np.argwhere((drawn == vis.ANCHOR_COLOUR).all(-1))
    assert len(marked) > 0
    assert abs(marked[:, 0].mean() - 12) < 2 and abs(marked[:, 1].mean() - 50) < 2


def test_heat_colours_run_dark_to_bright():
    ramp = vis.heat_colours(np.linspace(0, 1, 11)).sum(-1)
    assert (np.diff(ramp) > 0).all()


@pytest.mark.parametrize("args, message", [
    (["--stages", "3"], "stage 3 uses a 1×1 grid"),
    (["--stages", "5"], "stage 5 does not exist"),
    (["--block", "4"], "block 4 does not exist in stage 1"),
    (["--anchor", "100", "5"], "outside the 48×40 image"),
])
def test_bad_requests_are_one_clear_error_line(tmp_path, capsys, args, message):
    scene(48, 40).save(tmp_path / "img.png")
    code = vis.main([str(tmp_path / "img.png"), "--model", "tiny", "--out", str(tmp_path), "--size", "0",
                     "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("img_stage*.png"))


def test_undecodable_image_is_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code = vis.main([str(tmp_path / "img.jpg"), "--model", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: cannot decode") and "img.jpg" in err


def test_captions_wrap_to_a_narrow_picture(model):
    """A portrait photo resized to 224 on its short side (as sklearn's 427×640 china.jpg is): every
    caption line fits the picture's width instead of running off its right edge."""
    img = scene(224, 336)
    for name, picture in vis.visualize(model, img, stages=(1,), notes=[vis.RANDOM_WEIGHTS_NOTE]).items():
        assert picture.width == 224, name
        caption = np.asarray(picture.convert("L"))[336:]
        assert (caption > 128).any(axis=1).sum() > 3 * 8  # several wrapped lines of text
        assert (caption[:, -2:] <= 40).all()  # nothing drawn at the right edge: the text wrapped before it


def test_wrap_text_keeps_every_word_and_fits():
    words = "stage 1, block 0: colour = the super token each pixel is most associated with".split()
    lines = vis.wrap_text(" ".join(words), 60, lambda t: 6 * len(t))
    assert " ".join(lines).split() == words and all(6 * len(line) <= 60 for line in lines)
    assert vis.wrap_text("x" * 25, 60, lambda t: 6 * len(t)) == ["x" * 10, "x" * 10, "x" * 5]


def test_maps_come_from_the_modules_own_association_in_float64(model, monkeypatch):
    """visualize runs the block's SuperTokenAttention.association (no copy of it), in float64."""
    seen = []
    original = stvit.SuperTokenAttention.association

    def spy(self, tokens):
        seen.append(tokens.tokens.dtype)
        return original(self, tokens)

    monkeypatch.setattr(stvit.SuperTokenAttention, "association", spy)
    x = normalised(scene(40, 32))
    (maps,) = vis.analyse(model, x, stages=(1,))
    # The model's own forward (float32) while the input is captured, then visualize's float64 call.
    assert seen == [torch.float32, torch.float64] and maps.association.dtype == torch.float64


def test_non_stvit_models_are_refused_clearly(tmp_path, capsys):
    scene(48, 40).save(tmp_path / "img.png")
    with pytest.raises(SystemExit) as e:
        vis.main([str(tmp_path / "img.png"), "--model", "sovit_tiny", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "only STViT models" in err and "stvit_small" in err
    with pytest.raises(ValueError, match="only STViT models"):
        vis.check_stages(stvit.create_model("sovit_tiny"), (1,), 0)
