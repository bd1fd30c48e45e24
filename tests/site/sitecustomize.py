"""Test setup only: let torchvision's pure-Python parts (and so timm) import beside a CPU torch.

PyPI's torchvision wheel matching torch 2.13 is a CUDA build; with the CPU torch its compiled ops
(``torchvision/_C.so``) cannot load, and ``import torchvision`` then fails registering fake kernels
for ``torchvision::nms`` (``RuntimeError: operator torchvision::nms does not exist``; upstream:
pytorch/vision#9086, pytorch/pytorch#157648). Defining the two op schemas first lets the import
finish; the ops themselves stay unavailable, and nothing this project tests calls them.

``tests/conftest.py`` imports this for the pytest process and puts this folder on ``PYTHONPATH`` so the
processes tests start (``python -m bench …``) get it too, as ``sitecustomize``. It acts on the first
``import torchvision`` (not at start-up: importing torch early would come before the environment the
project's commands set for it), and does nothing where torchvision is absent or its ops load.
"""

import glob
import importlib.util
import os
import sys


def ensure_torchvision_ops() -> bool:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision is installed but its ops cannot
    load; True when it did."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return False
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libraries:
            torch.ops.load_library(libraries[0])  # what torchvision itself would load; fine if it works
            return False
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    ensure_torchvision_ops.library = library  # keep the registration alive
    return True


class _BeforeTorchvision:
    """A meta-path hook that runs :func:`ensure_torchvision_ops` once, just before torchvision is imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_ops()
        return None  # the usual finders import it


if not any(isinstance(hook, _BeforeTorchvision) for hook in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
