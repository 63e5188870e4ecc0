"""The load generator (``metalserve load``) and the benchmarks and GPU checks (``metalserve
bench ...``): not part of the replica. Nothing is imported here, so that building their command
line stays cheap; ``metalserve.bench.cli`` checks that their dependencies (the ``bench`` extra)
are installed before anything else of the package is imported.
"""
