"""Integer-only inference of a trained student (I-BERT operators, integer engine)."""
