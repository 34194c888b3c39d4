"""Image and file I/O: volumes (NIfTI, UA-MT h5) and atomic writes."""
