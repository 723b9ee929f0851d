"""Benchmarks as versioned specs: :mod:`~rlbench.bench.spec` loads and validates the TOML files
(``benchmarks/<suite>/<name>-v<N>.toml``), :mod:`~rlbench.bench.runner` plans and runs them
(training, then the evaluation harness; resumable). Importing this package imports neither.
"""
