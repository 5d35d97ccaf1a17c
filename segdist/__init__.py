"""segdist: dataset-scale object proposals (DeepMask, SharpMask, Mask R-CNN) on Ray."""

__version__ = "0.1.0"
