"""The trained model as a file: the model bundle (network + settings + calibration + position statistics), its archive format, training checkpoints, and the per-user model folder."""
