"""coupled_ds: Coupled Adam (Stollenwerk & Stollenwerk, ACL 2025) for sharded LLM pretraining.

Quick start::

    from coupled_ds import CoupledAdam, coupled_param_groups
    opt = CoupledAdam(coupled_param_groups(model), lr=3e-4, betas=(0.9, 0.95))
"""

from coupled_ds.geometry import ShardGeometry, full_matrix_geometry
from coupled_ds.groups import NoEmbeddingFoundError, coupled_param_groups, find_coupled_parameters
from coupled_ds.optimizer import CoupledAdam

__all__ = [
    "CoupledAdam",
    "NoEmbeddingFoundError",
    "ShardGeometry",
    "coupled_param_groups",
    "find_coupled_parameters",
    "full_matrix_geometry",
]
__version__ = "0.1.0"
