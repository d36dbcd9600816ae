"""From the pretext network to a detector's or a normals net's initialisation (section 4.3, Figure 6).

- `convert`: batch-norm folding, the pretext tower copied into the Figure 6 trunk, the paper's init names
  (`INITS`, `convert`, `load_pretext_tower`);
- `trunk`: the Figure 6 trunk and head (the R-CNN-style rows), and the converted checkpoint format (`build_trunk`,
  `load_checkpoint`, `load_trunk`);
- `caffenet`: the rescale rows' CaffeNet-shaped network, its conversion and checkpoint (`convert_caffenet`,
  `load_converted`, which reads either format);
- `imagenet`: ImageNet-supervised baselines from torchvision's published weights (or a file), keys renamed
  into our towers and logged (`load_imagenet`);
- `rescale`: the data-dependent init of Kraehenbuehl et al. (k-means init and between-layer rescaling).
"""
