"""Layer 2: where and how a run computes: processes, sharding, precision, loading models, and which parallel set-ups ilora trains."""
