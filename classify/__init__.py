"""Train, evaluate, save and use classifier heads on a featurize cache."""
