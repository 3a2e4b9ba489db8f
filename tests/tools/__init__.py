"""What a user runs: the command line, its settings, and the benchmark."""
