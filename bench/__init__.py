"""Benchmarks of evp, alone and side by side with Redis Streams and NATS.

`python -m bench --help` lists the options; docs/benchmarks.md records the figures.
"""
