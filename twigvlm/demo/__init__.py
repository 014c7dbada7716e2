"""The embedded demo VLM: a SmolLM2-135M-Instruct decoder (converted once from a PyPI package), our own vision
tower and projector, and a trained twig."""
