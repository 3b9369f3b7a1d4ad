"""The engine: autograd Functions, modules, patcher, quantizer, data, trainer and CLI."""
