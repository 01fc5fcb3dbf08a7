"""nn.Modules built from the ops; each chooses chunked or step mode itself."""

from mmrec.layers.basic import CausalConv, GeluMLP, SwiGLU
from mmrec.layers.memory import LongTermMemory, MemoryOutput
from mmrec.layers.short_term import ShortTermMixer

__all__ = ["CausalConv", "GeluMLP", "LongTermMemory", "MemoryOutput", "ShortTermMixer", "SwiGLU"]
