"""Benchmarks for stvit: ``python -m bench {flops,throughput,scaling,profile} --help``.

Results measured on this project's machines are in ``bench/RESULTS.md``.
"""
