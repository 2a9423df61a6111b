"""Data before the network: preprocessing (reorientation, normalisation, tissue masks) and the data sets (synthetic cohorts, BraTS)."""
