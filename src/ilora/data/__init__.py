"""Layer 2: data in: reading files in LLaMA-Factory's formats, encoding rows into token ids, benchmark layouts and corpora."""
