"""The base every layer stands on: datasets and pixel scaling, devices, image grids, storage URIs, atomic files, one-line errors."""
