"""The paper's experiments: many-seed comparisons, fixed-budget sweeps, cost tables,
zero-shot XNLI, and reports with plots."""
