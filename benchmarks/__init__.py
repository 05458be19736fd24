"""Benchmarks of hybridinval: ``python -m benchmarks`` (or ``make bench``).

Results go to ``benchmarks/results/``: a Markdown table and a JSON file with every figure.
"""
