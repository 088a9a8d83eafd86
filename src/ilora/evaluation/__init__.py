"""Layer 6: scoring test sets, general-ability perplexity, continual-learning metrics, results and reports."""
