# onnxruntime-genai greedy tokens from the built Gemma 3 270M (the worker's _load_genai / greedy)
import json, sys
from benchmarks import genai_worker
ref = json.load(open(sys.argv[1]))
run, info = genai_worker._load_genai({"genai_dir": sys.argv[2] if len(sys.argv) > 2 else "runs/bench/gemma3-270m/genai-int4", "threads": 2,
                                      "max_new_tokens": 16})
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("runs/bench/gemma3-270m/genai-int4-hf")
for prompt, r in ref.items():
    toks = run(r["prompt_ids"])[0]
    n = next((i for i, (a, b) in enumerate(zip(toks, r["tokens"])) if a != b), len(toks))
    same = sum(a == b for a, b in zip(toks[:10], r["tokens"][:10]))
    print(json.dumps({"prompt": prompt, "genai": toks, "hf": r["tokens"], "genai_text": tok.decode(toks),
                      "hf_text": r["text"], "first10_positions_equal": same, "common_prefix": n}))
