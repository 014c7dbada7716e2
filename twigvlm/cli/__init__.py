"""The command line: the `twigvlm` console script (`main`: grow, generate, tiny, demo, train, distill-data, bench,
serve, chat) and the interactive chat (`chat`)."""
