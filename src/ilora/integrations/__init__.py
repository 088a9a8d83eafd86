"""Layer 8: ilora's methods inside other libraries' trainers (TRL's `SFTTrainer`)."""
