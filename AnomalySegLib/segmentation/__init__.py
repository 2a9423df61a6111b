"""From an anomaly map to a mask, torch-free (the Slicer GUI process uses it): calibration table and operating point, thresholding and post-processing, lesions."""
