"""stvit: the Super Token Vision Transformer (Huang et al., CVPR 2023) and the efficient vision
transformers it is compared with (SG-Former, So-ViT/SoT, LVT), one model contract for all.

    import stvit
    model = stvit.create_model("stvit_small")
    stvit.load_checkpoint(model, "stvit-small-224.pth")
    stvit.list_models()  # every registered variant, family by family
    seg = stvit.create_segmentor("stvit_small", head="upernet", num_classes=150)  # UperNet on it
"""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_state_dict
from .contract import IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, ModelBase
from .flops import count_macs, count_params
from .models import create_model
from .models.lvt import LVT
from .models.sgformer import SGFormer
from .models.sovit import SoT, SoViT
from .models.stvit import STViT, MultiHeadSelfAttention, SuperTokenAttention
from .optimize import optimize
from .registry import FAMILIES, MODELS, list_families, list_models, model_entry, register_family, register_model, resolve_name
from . import segmentation
from .segmentation import create_segmentor

__all__ = [
    "create_model", "list_models", "list_families", "model_entry", "resolve_name", "register_model",
    "register_family", "FAMILIES", "MODELS", "ModelBase", "FeatureInfo", "STViT", "SGFormer", "SoViT", "SoT", "LVT",
    "SuperTokenAttention",
    "MultiHeadSelfAttention", "load_checkpoint", "read_checkpoint", "save_state_dict", "CheckpointError",
    "count_macs", "count_params", "optimize", "IMAGENET_MEAN", "IMAGENET_STD", "segmentation", "create_segmentor",
]
__version__ = "0.2.0"
