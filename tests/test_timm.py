"""The zoo in timm: ``import stvit.timm`` registers every variant, ``timm.create_model`` builds ours
(checkpoints, classes, backbones, the evaluation transform), and timm's own model tests pass on them.

timm's tests are its repository's ``tests/test_models.py`` for the installed timm version, taken from
timm's source distribution on PyPI once and cached under ``${XDG_CACHE_HOME:-~/.cache}/stvit/timm-tests``.
They run in a pytest subprocess restricted to our variants (TorchScript cases deselected: TorchScript is
deprecated in torch and not offered here), with the two declarations timm makes for each model family
it ships, here for ours: the family's module in ``FEAT_INTER_FILTERS`` (its models have
``forward_intermediates``, so the feature and pruning tests select them) and, for families whose
``forward_features`` gives tokens rather than an NCHW map, its models in ``NON_STD_FILTERS``.

Every selected case must pass, but for one check that cannot hold by design: timm's
``test_model_default_cfgs_non_std`` wants the pre-logits of a token model as wide as its tokens, and
So-ViT's and SoT's are [class token; second-order features]. That case is a strict expected failure
(on an AssertionError), and the rest of that test runs separately through timm's own helpers.

By default the subprocess tests the small variant of every family (our demo models); with
``STVIT_TIMM_TESTS=all`` it tests every registered variant (minutes on a CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import stvit
from conftest import unavailable

timm = pytest.importorskip("timm", reason='timm is not installed (pip install "stvit[timm]")')
import stvit.timm as stvit_timm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {family: next(n for n in stvit.list_models(family) if stvit.model_entry(n).ours) for family in stvit.FAMILIES}
REGISTERED = [name for names in stvit_timm.REGISTERED.values() for name in names]


# ---- the registration --------------------------------------------------------------------------

def test_every_variant_is_registered_under_its_family_without_clashes():
    assert set(REGISTERED) == set(stvit.list_models())
    for family, names in stvit_timm.REGISTERED.items():
        assert sorted(timm.list_models(module=family)) == sorted(names)  # nothing of timm's own in it
        for name in names:
            cfg = timm.models.get_pretrained_cfg(name)
            with torch.device("meta"):
                ours = stvit.create_model(name).pretrained_cfg
            assert cfg.architecture == name and cfg.input_size == ours["input_size"]
            assert (cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std) == (
                ours["crop_pct"], ours["interpolation"], ours["mean"], ours["std"])
    # timm's names are lower case; ours must not shadow one of them in any case either
    theirs = {n.lower() for n in timm.list_models() if n not in REGISTERED}
    assert not theirs & {n.lower() for n in REGISTERED}


def test_import_stvit_does_not_import_timm_and_a_missing_timm_says_how_to_install_it():
    code = textwrap.dedent("""
        import sys
        import stvit
        assert "timm" not in sys.modules, "import stvit imported timm"
        sys.modules["timm"] = None  # as if timm were not installed
        try:
            import stvit.timm
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("import stvit.timm worked without timm")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install "stvit[timm]"' in result.stdout


@pytest.mark.parametrize("family", list(TINY))
def test_create_model_builds_ours_and_loads_checkpoints_through_the_family_filter(family, tmp_path):
    name = TINY[family]
    torch.manual_seed(0)
    source = stvit.create_model(name).eval()
    state = source.state_dict()
    if family == "stvit":  # the authors' release files carry constant kernels the filter drops
        state["layers.0.blocks.0.attn.unfold.weights"] = torch.ones(9, 1, 3, 3)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state, "epoch": 300}, path)
    x = torch.randn(2, 3, *source.pretrained_cfg["input_size"][1:])

    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert isinstance(model, stvit.FAMILIES[family].model_class)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    # another number of classes: timm drops the classifier, the rest loads
    five = timm.create_model(name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert five(x).shape == (2, 5)
        torch.testing.assert_close(five.forward_features(x), source.forward_features(x), rtol=0, atol=0)

    # a backbone: timm's FeatureGetterNet over forward_intermediates, the maps of stvit's own backbone
    backbone = timm.create_model(name, pretrained=True, features_only=True, out_indices=(-2, -1),
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours = stvit.create_model(name, features_only=True, out_indices=(-2, -1), pretrained=source.state_dict()).eval()
    assert backbone.feature_info.channels() == ours.feature_info.channels()
    assert backbone.feature_info.reduction() == ours.feature_info.reduction()
    with torch.no_grad():
        for got, want in zip(backbone(x), ours(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict"):
        timm.create_model(name, pretrained=True)


def test_the_calls_of_mmpretrain_and_mmseg_timm_backbones():
    """What their TIMMBackbone does with a timm model (mmpretrain's and mmsegmentation's, read in their
    sources; neither is installed here): create it with these keywords, then drop the classifier."""
    model = timm.create_model(model_name="lvt_tiny", features_only=True, pretrained=False, in_chans=3,
                              checkpoint_path="", out_indices=(1, 2, 3))
    assert not hasattr(model, "reset_classifier")  # mmpretrain calls it only where it exists
    model.global_pool = model.fc = model.classifier = None  # mmsegmentation's TIMMBackbone
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == model.feature_info.channels() == [48, 64, 96]
    classifier = timm.create_model(model_name="stvit_tiny", features_only=False, pretrained=False, in_chans=3,
                                   checkpoint_path="")
    classifier.reset_classifier(0, "")  # mmpretrain, features_only=False: the unpooled final map
    with torch.no_grad():
        assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, classifier.num_features, 2, 2)


@pytest.mark.parametrize("family", list(TINY))
def test_timm_data_config_is_our_evaluation_transform(family):
    from PIL import Image

    from stvit.images import EvalTransform

    model = timm.create_model(TINY[family])
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = Image.fromarray(torch.randint(0, 256, (150, 333, 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(transform(image), EvalTransform(stvit.create_model(TINY[family]).pretrained_cfg)(image),
                               rtol=0, atol=1e-6)


def test_python_m_stvit_timm_runs_a_script_with_the_zoo_registered(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("import sys, timm\nm = timm.create_model(sys.argv[1])\nprint(type(m).__name__, sys.argv[2:])\n")
    result = subprocess.run([sys.executable, "-m", "stvit.timm", str(script), "sot_mini", "--flag"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("SoT ['--flag']")
    assert stvit_timm.main([str(tmp_path / "nope.py")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope.py'} is not a file")


# ---- timm's own model tests ---------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stvit" / "timm-tests" / timm.__version__


def timm_test_file() -> Path:
    """timm's tests/test_models.py for the installed version: cached, or taken from its sdist."""
    cached = cache_dir() / "test_models.py"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   "--dest", tmp, f"timm=={timm.__version__}"], capture_output=True, text=True,
                                  timeout=300)
        archives = list(Path(tmp).glob("timm-*.tar.gz"))
        if download.returncode or not archives:
            unavailable(f"timm's model tests for timm {timm.__version__} could not be obtained: `pip download "
                        f"--no-binary :all: timm=={timm.__version__}` failed ({download.stderr.strip()[-300:]}). "
                        f"Put tests/test_models.py of that sdist at {cached}")
        with tarfile.open(archives[0]) as tar:
            member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
            text = tar.extractfile(member).read()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_bytes(text)
    tmp_file.replace(cached)
    return cached


def test_timms_tests_out_of_reach_skip_here_and_fail_under_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if PyPI could not be reached
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="could not be obtained"):
        timm_test_file()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Under CI"):
        timm_test_file()


# The line of timm's test file before which the declarations for our families go (after both lists).
ANCHOR = "NUM_NON_STD = len(NON_STD_FILTERS)\n"

# timm's test_model_default_cfgs_non_std wants a model built with num_classes=0 to return features of
# width num_features. So-ViT's and SoT's pre-logits are [class token; second-order features], wider than
# the tokens (num_features): that check cannot hold for them, and the rest of that test runs in
# test_stvit_rest.py below (timm's own helpers); every other check of every test must pass.
WIDER_PRE_LOGITS = "test_model_default_cfgs_non_std"

PLUGIN = '''
import pytest
import stvit.timm  # noqa: F401  (registers the zoo before timm's test module lists models)

SELECTED = set({selected!r})
WIDER = set({wider!r})


def pytest_configure(config):
    for marker in ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward",
                   "fxbackward", "timeout"):
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {{}})
        name = str(params.get("model_name", "")).split(".")[0]
        (keep if name in SELECTED and "torchscript" not in item.name else drop).append(item)
        if name in WIDER and item.originalname == {test!r}:
            item.add_marker(pytest.mark.xfail(strict=True, raises=AssertionError, reason="pre-logits wider than "
                                              "num_features (second-order head)"))
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
'''

REST = '''
import pytest
import torch
from timm import create_model

import test_models as T


@pytest.mark.parametrize("model_name", sorted({wider!r}))
def test_default_cfgs_non_std_after_the_width_check(model_name):
    model = create_model(model_name, pretrained=False, device="meta", dtype=torch.float32).eval()
    cfg, state = model.default_cfg, model.state_dict()
    for name in cfg["classifier"]:
        assert name + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state
    T._assert_reset_classifier_preserves_parent_device_dtype(model)
    T._assert_factory_device(model_name, "meta")
    T._assert_frozen_survives_reset_and_resize(model_name, "meta", reset_pool=False)
'''


def selected_variants() -> list[str]:
    return REGISTERED if os.environ.get("STVIT_TIMM_TESTS") == "all" else list(TINY.values())


def test_timms_own_model_tests_pass_for_our_variants(tmp_path):
    source = timm_test_file().read_text()
    if source.count(ANCHOR) != 1:
        pytest.fail(f"timm {timm.__version__}'s test_models.py has changed shape: no single line {ANCHOR.strip()!r} "
                    f"to declare our families before; update ANCHOR in {__file__}")
    selected = selected_variants()
    families = list(stvit_timm.REGISTERED)
    token_models = [n for n in REGISTERED if not stvit_timm.MAP_FEATURES[stvit.model_entry(n).family]]
    wider = []
    for name in selected:
        with torch.device("meta"):
            model = stvit.create_model(name)
        if name in token_models and model.head_hidden_size != model.num_features:
            wider.append(name)
    declarations = (f"# stvit (tests/test_timm.py): our families, declared as timm declares each of its own\n"
                    f"FEAT_INTER_FILTERS += {families!r}\nNON_STD_FILTERS += {token_models!r}\n")
    (tmp_path / "test_models.py").write_text(source.replace(ANCHOR, declarations + ANCHOR))
    (tmp_path / "conftest.py").write_text(PLUGIN.format(selected=selected, wider=wider, test=WIDER_PRE_LOGITS))
    (tmp_path / "test_stvit_rest.py").write_text(REST.format(wider=wider))
    report = tmp_path / "report.xml"
    # One thread: idle OpenMP threads spin, which slows these small models many times on a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                             "--junitxml", str(report), "test_models.py", "test_stvit_rest.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    if not report.is_file():
        pytest.fail(f"timm's tests did not run:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        status = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        if status == "skipped" and "xfail" in (case.find("skipped").get("type") or ""):
            status = "xfailed"
        outcomes[case.get("name")] = status
    bad = {k: v for k, v in outcomes.items() if v not in ("passed", "xfailed")}
    assert not bad and result.returncode == 0, f"{bad}\n{result.stdout[-6000:]}"
    # Every variant went through every test timm has for a model of its kind.
    for name in selected:
        family = stvit.model_entry(name).family
        expected = ["test_model_forward", "test_model_backward", "test_model_forward_fx", "test_model_backward_fx",
                    "test_model_forward_intermediates", "test_model_forward_intermediates_features",
                    "test_prune_intermediate_layers_contract"]
        if stvit_timm.MAP_FEATURES[family]:
            expected += ["test_model_default_cfgs", "test_model_forward_features"]
        else:
            expected += ["test_model_default_cfgs_non_std"]
        ran = {case.split("[")[0] for case, status in outcomes.items() if f"-{name}]" in case or f"[{name}]" in case}
        assert set(expected) <= ran, (name, set(expected) - ran)
    assert sorted(n for n, s in outcomes.items() if s == "xfailed") == sorted(
        f"{WIDER_PRE_LOGITS}[1-{n}]" for n in wider)
