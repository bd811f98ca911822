"""Benchmarks: the project's benchmark model and the commands that time methods on it (JSON out)."""

from lvlm_steer.bench.model import BENCH_VARIANTS, benchmark_image, benchmark_inputs, benchmark_model, reference_dir

__all__ = ["BENCH_VARIANTS", "benchmark_image", "benchmark_inputs", "benchmark_model", "reference_dir"]
