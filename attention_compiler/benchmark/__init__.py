"""Measuring compiled graphs: timing, peak memory, the attention cost model, torch baselines and
the option matrix the accuracy sweep walks."""
