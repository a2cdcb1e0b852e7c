"""The fusion methods: each one plan producer on the shared engine plus its entry point."""
