"""Evaluation against lesion labels: metrics, the harness, label files, figures, reports and machine information."""
