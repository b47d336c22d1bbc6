"""Which exact encoding finds every weight of gemma-3-270m-q4_k_m.gguf again in its dequantized floats
(exact_blocks.py's detectors on gguf-py's own dequantization, as transformers does it)."""
import glob, sys, collections
import numpy as np, gguf
from gguf.quants import dequantize
import exact_blocks as ep  # beside this file (the run imported it as exact_patch)
from exporter.fetch import resolve_local
from exporter.recipes import load_recipe
p = '/'.join(resolve_local(load_recipe('gemma3-270m').source))  # the run globbed ~/.cache/lama for it
r = gguf.GGUFReader(p)
c = collections.Counter()
for t in r.tensors:
    if t.tensor_type.name == 'F32' or t.name == 'token_embd.weight':
        continue
    W = dequantize(t.data, t.tensor_type).astype(np.float32).T
    q4 = ep.q4_gap_blocks(W) is not None
    i8 = None if q4 else ep.int8_any(W)
    c[(t.tensor_type.name, 'q4' if q4 else (f'int8/{i8[2]}' if i8 else 'none'))] += 1
print(c)
