"""From the pretext network to a detector's or a normals net's initialisation (section 4.3, Figure 6).

- `convert`: batch-norm folding, the pretext tower copied into the Figure 6 trunk, one checkpoint per init
  (`convert`, `load_pretext_tower`);
- `trunk`: the Figure 6 trunk and head, and the converted checkpoint format (`build_trunk`, `load_checkpoint`,
  `load_trunk`);
- `rescale`: the data-dependent init of Kraehenbuehl et al. (k-means init and between-layer rescaling).
"""
