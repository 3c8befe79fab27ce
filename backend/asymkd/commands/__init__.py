"""CLI command modules: each has HELP, add_arguments(parser) and run(args, events)."""
