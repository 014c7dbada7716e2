"""Self-speculative decoding: the shallow net drafts (a chain or a tree), the deep layers verify in one pass, and
the accept rules keep the target's output exactly; `choice` decides which drafter a generation runs."""
