"""Layer 3: typed arguments (dataclasses whose field docs become `--help`), read from flags and YAML/JSON configs."""
