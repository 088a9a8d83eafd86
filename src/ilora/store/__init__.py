"""Layer 5: what ilora writes and reads back: task directories, checkpoints, run directories, and the ownership rules for paths."""
