"""Benchmarks of hybridinval and of what users would pick instead: ``python -m benchmarks``.

Results go to ``benchmarks/results/``: ``results.md`` (tables, every figure with its ratio to a
baseline measured in the same run), ``results.json`` (every figure) and PNG plots. A partial
run (no PostgreSQL, ``--skip``, ``--contenders``, ``--quick``) writes
``benchmarks/results/partial/`` instead, which is not committed.
"""
