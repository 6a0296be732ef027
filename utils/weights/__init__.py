"""Fetching and verifying the weights: downloads with bounded time and one downloader per file
(download.py), the torch.hub cache and its verification records (cache.py), and loading checkpoints
safely (checkpoint.py)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be downloaded, verified or loaded; the message says what to do."""
