"""nn.Modules over the ops: NF4Linear and LoRALinear (`linear`), and `quantize_model` with the bitsandbytes views
(`quantize`)."""
