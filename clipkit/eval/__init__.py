"""Evaluators run during and after training, and by ``clipkit eval`` (see ``runner.run_evals``)."""
