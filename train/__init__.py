"""Training for STViT: ``python -m train``.

Data side: ``train.data`` (ImageFolder, build_datasets), ``train.transforms`` / ``train.augment``
(DeiT-style augmentation on Pillow + torch), ``train.mixup`` (Mixup/CutMix, soft-target loss),
``train.samplers`` (repeated-augmentation and eval samplers) and ``train.synthetic`` (demo data).
"""
