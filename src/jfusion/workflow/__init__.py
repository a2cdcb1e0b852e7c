"""Everything around fusion: data loading, training K models, checkpoints, the CLI and the demo."""
