"""The train stage's machinery: the run's records (``job``), the objective and LR schedule
(``objective``), data parallelism (``distributed``), precision (``precision``), checkpoints and
resume (``checkpoint``) and the online-teacher baseline (``online``). ``stages/train.py`` holds the
recipe: setup, step, loop."""
