"""Job orchestration: what the entry scripts run once their arguments are parsed (load, quantize, calibrate, save;
load, sample, write)."""
