"""The pytest-benchmark suite: ``pytest bench --benchmark-only [--shapes smoke|default|full]``."""
