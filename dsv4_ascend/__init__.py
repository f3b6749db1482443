"""dsv4-ascend: DeepSeek-V4 inference for Ascend NPUs, with a pure-PyTorch reference backend.

`import dsv4_ascend` never imports torch_npu; only `dsv4_ascend.ops` does, lazily.
"""
from .backend import Backend, RunOptions
from .config import ConfigError, ModelConfig, load_config, preset

__version__ = "0.1.0"
__all__ = ["Backend", "RunOptions", "ModelConfig", "ConfigError", "load_config", "preset", "__version__"]
