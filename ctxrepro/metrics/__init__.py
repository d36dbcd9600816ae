"""Cores of the public `ctxrepro eval` commands: VOC detection AP, NYUv2 normals, purity-coverage; and the VOC07
classification AP of the linear probes (`voc_cls`)."""
