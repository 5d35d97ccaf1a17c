"""The networks and their weights: DeepMask, SharpMask (faithful to the original) and torchvision's
Mask R-CNN. Running them over whole images is :mod:`segdist.proposers`.

Modules: ``layers`` (symmetric padding, folded BatchNorm), ``trunk`` (ResNet to layer3),
``deepmask`` and ``sharpmask`` (the nn.Modules, with keyword-only builders ``deepmask(*, trunk=...)``
and ``sharpmask(*, deepmask=...)``), ``maskrcnn`` (``build_maskrcnn(*, version, weights, ...)``),
``checkpoint`` (segdist safetensors checkpoints, ``build_model`` by kind name, ``load_weights`` of
a checkpoint or .t7 reference), ``weights`` (weight files and torchvision enums), ``t7`` (the
original model.t7 reader and converter).
"""
