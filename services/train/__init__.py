"""The train service: distributed PyTorch runs, their checkpoints and their models."""
