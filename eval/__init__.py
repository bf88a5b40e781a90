"""Evaluation of checkpoints as DeepSeek-V3 evaluates base models (report section 4.4): bits per byte
(`eval.bpb`), multiple choice by log-likelihood (`eval.choice`), greedy generation with exact match
(`eval.generate`), an lm-evaluation-harness adapter (`eval.harness`) and the `python -m eval` CLI.
`eval.scoring` holds the log-likelihood helpers the trainer's validation shares."""
