"""Proposal models: DeepMask, SharpMask (faithful to the original), Mask R-CNN (torchvision).

Modules: ``layers`` (symmetric padding, folded BatchNorm), ``trunk`` (ResNet to layer3),
``deepmask``, ``sharpmask``, ``inference`` (whole-image pyramid inference), ``maskrcnn``,
``checkpoint`` (our safetensors checkpoints), ``weights`` (weight files and torchvision enums),
``generator`` (the one interface the job calls: :func:`segdist.models.generator.build_generator`).
"""
