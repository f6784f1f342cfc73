"""Training the embedded default model on the shapes dataset."""
