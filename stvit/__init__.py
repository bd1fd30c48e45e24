"""stvit: the Super Token Vision Transformer (Huang et al., CVPR 2023) in PyTorch.

    import stvit
    model = stvit.create_model("stvit_small")
    stvit.load_checkpoint(model, "stvit-small-224.pth")
"""

from .attention import MultiHeadSelfAttention, SuperTokenAttention
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_state_dict
from .flops import count_macs, count_params
from .model import IMAGENET_MEAN, IMAGENET_STD, STViT
from .optimize import optimize
from .registry import create_model, list_models, model_config, resolve_name

__all__ = [
    "STViT", "SuperTokenAttention", "MultiHeadSelfAttention", "create_model", "list_models", "model_config",
    "resolve_name", "load_checkpoint", "read_checkpoint", "save_state_dict", "CheckpointError",
    "count_macs", "count_params", "optimize", "IMAGENET_MEAN", "IMAGENET_STD",
]
__version__ = "0.1.0"
