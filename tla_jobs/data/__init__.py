"""Data: checks of the ImageFolder layout, the bundled datasets, and resumable loaders."""
