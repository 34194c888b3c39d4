"""`dtml serve`: segmentation as an HTTP service (jobs, DICOMweb in and out, metrics).

Part of the command layer, like `dtml_deploy.cli`: it sits on the core and nothing in the core imports
it. The web stack (FastAPI, uvicorn, python-multipart, dicomweb-client, prometheus-client) is the
`serve` extra; importing this package alone needs none of it.
"""
