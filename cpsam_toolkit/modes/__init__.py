"""Modes: layers above the core that wrap the predictor — planar 2D (:mod:`.planar`),
volumes (:mod:`.volume`) and panoptic class maps (:mod:`.panoptic`). Blockwise (images larger
than memory) is :mod:`cpsam_toolkit.blockwise`. :meth:`cpsam_toolkit.segment.CellposeSAM.segment`
is the one place that picks a mode."""
