"""CLI command modules: each has add_arguments(parser) and run(args, events); the one-line
help of every command is in cli.COMMANDS, so `asymkd --help` imports none of them."""
