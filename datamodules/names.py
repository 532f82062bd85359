"""The names of the data's splits and views, free of torch and Lightning: option parsers read them
before anything heavy is imported (a refused option is reported at once)."""

#: the splits a data set's files hold (``all`` is both)
SPLITS = ("train", "val", "all")
#: what ``attack.py --split`` draws batches from: a split, or train.py's partition of one
#: (``fit_train``/``fit_val``, ``datamodules.views``)
VIEWS = ("train", "val", "all", "fit_train", "fit_val")
