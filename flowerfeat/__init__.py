"""flowerfeat: transfer learning on cached VGG16 features (extract once, fit the head in a second)."""

__version__ = "0.1.0"
# Bumped whenever the HDF5 layout changes; part of every feature fingerprint.
FORMAT_VERSION = 1
