"""Fast R-CNN fine-tuning of the Figure 6 network on PASCAL VOC 2007 (paper section 4.3, Table 1).

Modules: `boxes` (IoU, regression targets, flips), `proposals` (selective search: Fast R-CNN's .mat files or
OpenCV's 'fast' mode, cached per image), `roidb` (images, ground truth and proposals of a split), `sampling`
(RoI mini-batches), `loader` (step-seeded batches in DataLoader workers), `model` (RoI pooling on the converted trunk, multi-task loss), `train` (resumable), `infer` (per-class
NMS, devkit results files) and `table` (Table 1 beside our numbers).
"""
