"""The demo world's data: procedural scenes (`scenes`), easy-VQA (`easyvqa`), and the examples built from them
(`examples`: the training mixture, the val and test sets, and writers of LLaVA-format sets); procedural videos
with ground truth (`moving_shapes`)."""
