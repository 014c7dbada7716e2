"""The demo world's data: procedural scenes (`scenes`), easy-VQA (`easyvqa`), and writers of LLaVA-format sets."""
