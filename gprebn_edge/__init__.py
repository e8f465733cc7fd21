"""gprebn-edge: GpreBN test-time batch-norm adaptation, folding and export for edge GPUs."""

__version__ = "0.1.0"
__all__ = ["__version__"]
