"""Surface normals on NYUv2 (section 4.4, Table 2), as Wang et al.'s coarse network on the Figure 6 trunk.

- `data`: NYUv2 images, splits and ground-truth normals (the FAIR release, or fitted from depth);
- `depth`: normals from depth by local plane fitting;
- `grid`: the trunk's cells and their receptive-field centres, where targets are sampled and predictions live;
- `model`: the 40-cluster codebook, the head on the trunk, training (`build_net`, `train`, `predict_coarse`);
- `report`: evaluation at full resolution, Table 2's rows and the example figure;
- `table`: Table 2 as published (no torch: the report stage imports it).
"""
