"""What fastdca knows about the libraries users train with besides transformers: TRL, PEFT."""
