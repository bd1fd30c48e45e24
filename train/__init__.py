"""Training for every model of the zoo: ``python -m train`` (demo) and ``torchrun ... -m train --model large``.
It speaks only to the model contract (``stvit/contract.py``); a family's recipe comes from its registration.

Run side: ``train.config`` (flags, recipe presets), ``train.loop`` (the run: data, model, resume,
epochs), ``train.engine`` (training step, evaluation), ``train.distributed`` (process group, FSDP2),
``train.optim`` (AdamW groups, EMA), ``train.schedule`` (warm-up + cosine), ``train.checkpoint``
(atomic distributed checkpoints, ``model_final.pt``), ``train.faults`` (preemption signals, elastic
restarts, checkpoint validation, disk checks), ``train.metrics`` (metrics.jsonl, TensorBoard).

Data side: ``train.data`` (ImageFolder, build_datasets), ``train.transforms`` / ``train.augment``
(DeiT-style augmentation on Pillow + torch), ``train.mixup`` (Mixup/CutMix, label smoothing),
``train.samplers`` (repeated-augmentation and eval samplers) and ``train.synthetic`` (demo data).
"""
