"""What runs while an accelerated pipeline samples: the step clock, the scheduler attachment, and
the helpers that attach named hooks and data to a model's modules."""
