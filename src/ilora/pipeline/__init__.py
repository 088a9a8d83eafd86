"""Layer 8: the commands' work in order: train one task, run a sequence, evaluate, export, the demo."""
