"""What a `mitigate` run writes and how it reports: checkpoints, the exported model with its
card, results.json / results.md with figures, predictions, progress lines, one-line errors, and
the run folder's protection. Used by every method; knows none of them."""
