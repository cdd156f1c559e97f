"""GenRM-CoT work: verification data and the scripts that build it."""
