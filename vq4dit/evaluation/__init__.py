"""Sample-quality metrics: FID (digits classifier or Inception features), accuracy, paired PSNR/MSE."""
