"""Interop with the formats LLM360's models live in, both ways (docs/interop.md).

    layouts.py      what a Hugging Face layout is (tensor names, config.json), the tensor
                    reader that refuses missing, misshapen and left-over tensors
    hf_classes.py   `llama` (LlamaForCausalLM) and `stablelm` (StableLmForCausalLM): muP
                    folded into the weights, rotary pairs permuted to rotate-half
    llm360.py       `llm360`: LLM360's own CrystalCoder layout (GPT-2 names, Conv1D
                    orientation, muP in config.json) for their trust_remote_code class
    registry.py     the layouts by name, `--layout=auto`, the layout a config.json describes
    tree.py         crystal's param tree: scanned <-> per layer
    hf.py           `python -m crystal.interop.hf export|import`: safetensors (sharded with
                    an index), tokenizer files, model card; crystal checkpoints both ways
    cerebras_format.py, cerebras_import.py, cerebras_export.py, cerebras.py
                    Cerebras Model Zoo params.yaml (rel-1.9 flat and 2.x trainer formats)
                    <-> crystal configs: `python -m crystal.interop.cerebras import|export`
"""
