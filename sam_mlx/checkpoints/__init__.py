"""Checkpoints: reading, converting (Meta, transformers, MobileSAM), building the model, saving, the Hub."""
