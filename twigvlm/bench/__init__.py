"""`twigvlm bench`: accuracy retention and speed of every method against stock HF `generate`, with ablations."""
