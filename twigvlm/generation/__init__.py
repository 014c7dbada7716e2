"""One generation on the engine: the token loop and its stopping rules, streaming text, and the statistics it
leaves behind."""
