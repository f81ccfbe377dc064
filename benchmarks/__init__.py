"""Benchmarks: the optimizer comparison (``compare_optimizers.py``) and the cost profile (``test_cost_profile.py``)."""
