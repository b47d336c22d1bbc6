"""Which exact encoding exporter/gguf_blocks.py finds for every weight of gemma-3-270m-q4_k_m.gguf,
on gguf-py's own dequantization (the floats transformers loads). The embedding (Q8_0, also the LM
head) is left out: the exporter's tests and the int8 export show it found as Q8_0."""
import collections
import time

import gguf
import numpy as np
from gguf.quants import dequantize

from exporter.fetch import resolve_local
from exporter.gguf_blocks import detect
from exporter.recipes import load_recipe

r = gguf.GGUFReader('/'.join(resolve_local(load_recipe('gemma3-270m').source)))
found, t0 = collections.Counter(), time.perf_counter()
for t in r.tensors:
    if t.tensor_type.name == 'F32' or t.name == 'token_embd.weight':
        continue
    kind = detect(dequantize(t.data, t.tensor_type).astype(np.float32).T)  # (K, N), as a MatMul holds it
    found[(t.tensor_type.name, kind[0] if kind else 'none')] += 1
print(dict(found), f"{time.perf_counter() - t0:.0f} s")
