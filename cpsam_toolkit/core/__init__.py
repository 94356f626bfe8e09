"""The core: arrays → network maps (:mod:`.predictor`), maps + settings → masks in any number
of dimensions (:mod:`.postprocess`), and the result type with its per-object table
(:mod:`.result`). It imports nothing above itself: no modes (3D, panoptic, blockwise), no
files, no adapters. See ``docs/architecture.md``."""
