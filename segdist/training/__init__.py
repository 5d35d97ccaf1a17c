"""Training DeepMask and SharpMask as the original did: sampler, loop, per-patch evaluation, Ray Train.

Modules: ``config`` (TrainConfig), ``crops`` (window resampling), ``sampler`` (DataSampler.lua),
``trainer`` (the loop), ``patch_eval`` (evalPerPatch.lua), ``checkpoints`` (weights + resume state
under an output URI), ``distributed`` (Ray Train TorchTrainer).
"""
