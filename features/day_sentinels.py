"""Day values that stand for no day, shared by the grid and its compiled kernels."""

import numpy as np

#: Day value for "no such day" (no purchase or interaction of the kind by the cutoff).
NO_DAY = np.iinfo(np.int32).min
#: First-purchase day of a customer who never bought.
NO_PURCHASE = np.iinfo(np.int32).max
