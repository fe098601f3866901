"""From a float model to a calibrated fake-quant model: capture, BN folding, CLE, quantizer insertion, calibration."""
