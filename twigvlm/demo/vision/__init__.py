"""Training the demo's vision tower and projector, one module per stage (run them with
`python -m twigvlm.demo.train_vision`):

- `pretrain` — stage 1: the ViT alone, with linear read-outs of what is where;
- `ground` — stage 1b: visual tokens regressed onto the decoder's embeddings of words naming their patches;
- `align` — stage 2: cross-entropy on answers through the frozen decoder (and an optional decoder LoRA);
- `evaluation` — the validation every stage reports (stock HF `generate` on the built-in tasks);
- `loop` — what the stages share: deterministic per-step batches, the schedule, optimizer steps, checkpoints.
"""
