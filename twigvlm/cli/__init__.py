"""The command line: the `twigvlm` console script (`main`: generate, grow, train, bench, serve, demo, tiny) and
its interactive `chat`."""
