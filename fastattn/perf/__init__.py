"""Performance tooling: the case table, FLOP/byte models, GPU timing, reports and the gate.

``python -m fastattn.perf {report,compare,history,check-json} ...``; see docs/benchmarks.md.
"""
