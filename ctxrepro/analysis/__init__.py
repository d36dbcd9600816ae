"""What the paper learns about the representation itself: one module per experiment.

- `pretext_eval`: accuracy on the pretext task, in VOC images, in boxes, train vs held-out (section 4.6);
- `retrieval`: nearest-neighbour patches by fc6 correlation, ours vs random vs ImageNet (section 4.1, Figure 4);
- `aberration`: where in the image a patch came from, with and without colour projection (section 4.2, Figure 5);
- `linear_probe`, `linear_heads`, `linear_online`: linear classifiers on frozen per-layer features (not in the
  paper: the later benchmark of Zhang et al. 2016/2017 and Goyal et al. 2019).
"""
