"""Files in and out: volumes (NIfTI, NRRD, MetaImage, DICOM) with their RAS geometry, Slicer segmentations, and the one atomic writer."""
