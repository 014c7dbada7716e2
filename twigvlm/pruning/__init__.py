"""Visual-token pruning: the prefill that scores and keeps tokens after layer K (twig, FastV) with FinalWipe,
VisionZip's reduction before the language model, and the picture of what was kept."""
