"""Teacher-forced top-1 agreement with the fp32 model of fake-quantized twins (the numerics the
export calibrates on), on the recipe's held-out windows, for several int4/int8 variants."""
import copy, json, sys, time
import numpy as np, torch
from benchmarks.llamacpp_fidelity import heldout_windows
from exporter.quantize import Scheme, fake_quantize

n_win = int(sys.argv[1]) if len(sys.argv) > 1 else 16
variants = sys.argv[2:] or ["int4", "int8", "int8-exact"]  # int4: the exporter's exact encodings of every GGUF kind
bb, windows, source, drawn = heldout_windows('gemma3-270m')
windows = windows[np.linspace(0, len(windows) - 1, n_win).round().astype(int)]
@torch.no_grad()
def top1(model):
    return np.concatenate([model(torch.from_numpy(windows[i:i + 4])).logits.argmax(-1).numpy() for i in range(0, len(windows), 4)])
t = time.time(); ref = top1(bb.model); print('fp32', time.time() - t, flush=True)
res = {}
for v in variants:
    prec = v.split('-')[0]
    scheme = Scheme.for_precision(prec, exact_blocks=('exact' in v) if prec == 'int8' else True)
    q = copy.deepcopy(bb.model); q.float()
    t = time.time(); n = fake_quantize([q], scheme); tq = time.time() - t
    t = time.time(); top = top1(q)
    res[v] = {"agreement": float((top == ref).mean()), "tokens": int(ref.size)}
    print(v, res[v], 'quantize s', round(tq), 'forward s', round(time.time() - t), flush=True)
    del q
print(json.dumps({"windows": drawn, "n": int(ref.size), "res": res}))
