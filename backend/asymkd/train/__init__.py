"""Training jobs: teacher, matcher, pairing and re-pairing, distillation, evaluation."""
