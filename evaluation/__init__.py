"""The accuracy evaluation: reference and ONNX answers per setting, decode fidelity, the report."""
