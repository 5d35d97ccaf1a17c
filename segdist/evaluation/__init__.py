"""Evaluation stage: exact, sharded average recall of proposals (COCOeval-identical), reports, plots.

Modules: ``protocol`` (thresholds, area ranges), ``groundtruth`` (GT per image in COCOeval's
order), ``matching`` (COCOeval's greedy matching), ``recall`` (integer counts and AR), ``metrics``
(the reported numbers and curves), ``sharded`` (one Ray task per chunk), ``report`` and ``plots``.
"""
