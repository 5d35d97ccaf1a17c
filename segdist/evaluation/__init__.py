"""Evaluation stage: exact average recall of proposals (COCOeval-identical), reports, plots.

Modules: ``protocol`` (thresholds, area ranges), ``groundtruth`` (GT per image in COCOeval's
order), ``kernels`` (the C inner loops: exact IoUs and COCOeval's greedy matching), ``recall``
(integer counts and AR), ``shard`` (one shard's work, a typed result), ``sharded`` (the driver:
in-process for small runs, one Ray task per chunk for large ones), ``metrics`` (the reported
numbers and curves), ``report`` and ``plots`` (SVG).
"""
