"""Benchmarks that print numbers and ratios: `asymkd bench accuracy|train|classify`.

Each module here has `add_arguments(parser)` and `run(args, events) -> int`.
"""
