"""Static-graph decode: torchair / aclgraph on NPU, torch.compile elsewhere."""
from .decoder import GraphDecoder, default_buckets

__all__ = ["GraphDecoder", "default_buckets"]
