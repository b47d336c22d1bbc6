# transformers 5 greedy tokens for Gemma 3 270M from the recipe's GGUF (exporter.backbone.load_backbone)
import json, sys, torch
from exporter.backbone import load_backbone
from exporter.recipes import load_recipe
bb = load_backbone(load_recipe("gemma3-270m").source)
model, tok = bb.model, bb.tokenizer
out = {}
for prompt in ["The capital of France is", "Once upon a time, there was a little"]:
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    new = g[0, len(ids):].tolist()
    out[prompt] = {"prompt_ids": ids, "tokens": new, "text": tok.decode(new)}
    print(prompt, ids, new, repr(tok.decode(new)), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
