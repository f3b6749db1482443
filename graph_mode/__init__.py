"""Static-graph decode and MTP verify (torchair / aclgraph on NPU, torch.compile elsewhere) and compiled prefill
ops."""
from .decoder import GraphDecoder, default_buckets
from .prefill import PREFILL_OPS, GraphPrefiller
from .verify import GraphVerifier

__all__ = ["GraphDecoder", "default_buckets", "GraphPrefiller", "PREFILL_OPS", "GraphVerifier"]
