import os

# In-process engines (start in seconds, two in a row work), a 1 GiB KV cache on CPU.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
