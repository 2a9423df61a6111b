"""The networks (torch): VAE and U-Net, attention maps, losses, each method's training loss and anomaly score, and device selection."""
