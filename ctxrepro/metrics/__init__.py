"""Cores of the public `ctxrepro eval` commands: VOC detection AP, NYUv2 normals, purity-coverage."""
