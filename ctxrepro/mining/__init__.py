"""Visual data mining (section 4.5, Figures 7-9): constellations of patches found by fc6 nearest neighbours.

- `search`: the feature bank of a folder of images and the nearest-neighbour search (`build_bank`, `search`);
- `constellations`: geometric verification of 2x2 constellations, cluster selection (`mine`, `purity_sets`);
- `html`: the offline HTML ranking of the mined clusters.
"""
