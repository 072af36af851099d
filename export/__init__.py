"""Export toolchain: trained model -> checked ONNX -> quantised -> gated -> engine -> bundle."""
