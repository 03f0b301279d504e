"""Conversion between our model folders and other formats: Hugging Face transformers (hf.py),
GGUF for llama.cpp (gguf.py), upstream MiniMind .pth (minimind.py), PEFT adapters (peft.py), and
tiny transformers-saved MoE stand-ins (standins.py). cli.py is the command line
(``python scripts/convert_model.py``). Nothing in model/ imports this package."""
