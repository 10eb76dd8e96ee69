"""refold benchmarks: every scenario side by side with its raw baselines, in one run.

`python -m bench.run --quick` runs them all against a local broker it starts itself; see
bench/README.md for what each scenario measures. Nothing here asserts on time.
"""
