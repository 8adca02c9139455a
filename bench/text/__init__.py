"""The text-conditional tier (issue 17): the offline CLIP tokenizer and the captions of the concepts."""
