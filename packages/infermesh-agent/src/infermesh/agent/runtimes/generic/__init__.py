"""Runtime adapters driven by a metric-name mapping: TGI, SGLang, TorchServe, TF Serving, OVMS
(shipped mappings in `mappings/`) and kind `generic` with an operator's mapping file."""
