"""bild: Big Little Decoder for Hugging Face models."""
