"""Benchmarks the library ships support for: datasets (GSM8K, GSM-Hard, MATH), metrics, math answer equivalence."""
