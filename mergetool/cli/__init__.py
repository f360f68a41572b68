"""The command-line edge: one module per subcommand; only this package prints or exits."""
