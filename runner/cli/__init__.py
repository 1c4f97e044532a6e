"""The command line: each command's options and output, nothing more."""
