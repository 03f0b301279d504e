"""Transforms that move MoE experts off the autograd graph onto the CPU: pinned torch experts or
KTransformers' kt-kernel (with LoRA on the experts). Applied to a finished model from outside."""
