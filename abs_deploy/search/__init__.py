"""Search: quantized layers, uniform QAT, ABS, BSQ and fine-tune. Never imports export/."""
