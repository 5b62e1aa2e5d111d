"""Pre-training stages that turn a freshly initialised tiny backbone into a 'pretrained' one (pointing.py).

Above the backbones it trains and the formats it answers in; it records its own MLflow run (tracking), and is
reached from the backbone configs' `build._target_`.
"""
