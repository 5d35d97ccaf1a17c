"""Build of the one compiled part, the evaluation kernels; all metadata lives in pyproject.toml.

``-ffp-contract=off``: the IoU formulas must round exactly as pycocotools' (no fused multiply-add).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("segdist.evaluation._kernels", ["segdist/evaluation/_kernels.c"],
                             extra_compile_args=["-O2", "-ffp-contract=off"])])
