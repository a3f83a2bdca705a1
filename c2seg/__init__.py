"""c2seg core: the dataset contract, typed configs and helpers shared by every stage.

The stages live in their own top-level packages: ``data_prep`` -> ``train`` -> ``inference``,
with ``slurm`` chaining their command lines on a cluster.
"""

__version__ = "0.1.0"
