"""Layer 3: the state a method owns: the LoRA adapters on one PEFT model (paired by module and slot) and the replay buffer."""
