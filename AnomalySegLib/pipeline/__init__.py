"""The stages that run a model: training, calibration on healthy volumes, inference, the per-case outputs; the intensity baseline and the training profiles."""
