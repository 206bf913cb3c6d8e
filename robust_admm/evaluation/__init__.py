"""Evaluation: robust accuracy under single attacks and ensembles counted as AutoAttack
counts it (`robustness`), the same on any JAX classifier as a library (`autoattack_api`:
the public `autoattack` and `attack`), the evaluation step run during training
(`eval_step`), the signs of gradient masking (`masking`) and robust accuracy versus
epsilon (`curves`)."""
