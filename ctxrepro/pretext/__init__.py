"""The pretext task of section 3: predict where a second patch sits relative to the first (Figure 2).

Modules, in the order the data flows:
- `sampling`: the 96/48 px grid, gap and jitter, the eight positions, patch cutting (section 3, docs/METHOD.md);
- `color`: mean subtraction, colour projection or dropping, random downsampling, RMS 50 (section 3.1);
- `data`: the resize manifest as an image table, the per-visit scale, the step-seeded batch plan, DataLoader workers;
- `model`: the Figure 3 network (AlexNet-style or VGG-style towers, fc6 pair head, fc7..fc9);
- `engine`: the training loop (`train`), resumable and guarded, and `export_weights`;
- `monitor`: the collapse monitor (live ReLU shares after fc6/fc7/fc8, weight norms);
- `distributed`: DDP with batch norm over the global batch;
- `export`: the exported network as evaluations load it (`load_pretrained`, `network_input`).

Import the submodules directly; this file imports nothing, so `import ctxrepro.pretext.sampling` stays light.
"""
