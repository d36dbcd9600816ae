"""Data sets for the pipeline: fetching (download, verify, extract), real-format readers, image handling.

Import the submodules directly (`from ctxrepro.data.fetch import fetch_dataset`); this package file stays
empty of imports so that `import ctxrepro.data.voc` does not pull in h5py or urllib.
"""
