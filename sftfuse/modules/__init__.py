"""nn.Modules over the ops: NF4Linear and LoRALinear (`linear`), `quantize_model` with the bitsandbytes views
(`quantize`), and opening transformers + bitsandbytes 4-bit checkpoint directories (`bnb_checkpoint`)."""
