"""Evaluation: robust accuracy under single attacks and ensembles counted as AutoAttack
counts it (`robustness`), the evaluation step run during training (`eval_step`), the
signs of gradient masking (`masking`) and robust accuracy versus epsilon (`curves`)."""
