"""Autograd Functions, one file per op, and the public function of each: cross_entropy, nf4, lora, lora_mlp,
rms_norm, attention. Each calls its op's launcher in `sftfuse.kernels`, which picks the Triton or PyTorch path."""
