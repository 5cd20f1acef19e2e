"""adamd benchmark harness: `python -m bench` runs every suite (bench/suites.py) in one run and
writes BENCHMARKS.md from scratch: a headline table of adamd beside its peers and limits, then a
section per suite with how each figure is measured."""
