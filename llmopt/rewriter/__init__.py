"""The torch.compile backend: capture, pass pipeline, report, fallback."""
